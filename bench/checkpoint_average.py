"""Would averaging a run's checkpoints, or stepping along its recent direction, lower the loss?

    python bench/checkpoint_average.py --run DIR [--at STEP] [--last 2,4,8,16] [--ema 0.5,0.8,0.9]
                                       [--along 1,2,5] [--scales -1,-0.5,0.5,1,2]

ES steps leave noise in the weights. If that noise were a fluctuation around a slowly moving
centre, an average of recent iterates (Polyak / SWA / EMA) would score better than the last one; if
it is a random walk the iterates share, it would not. Reads the run's checkpoints (write them
often: ``--set run.checkpoint_every=10``) and prints the held-out loss (the run's own windows and
``run.eval_samples``) of:

- the checkpoint at ``--at`` (default: the last);
- the uniform mean of the last K checkpoints up to it, for each K in ``--last``;
- an EMA over all checkpoints up to it (one update per checkpoint), for each β in ``--ema``;
- θ + s·(θ − θ_k) for the checkpoints k found ``--along`` checkpoints back: a line search along
  the recent displacement (s > 0: further along, s < 0: back);
- the RMS of each parameter group's weights at the first checkpoint and at ``--at``, and of the
  change between them.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from entry import number_list, parser, run_main  # noqa: E402
from ea4llm_pool import UserError  # noqa: E402
from ea4llm_pool.checkpoint import list_checkpoints, load_model_skeleton, weight_tensors  # noqa: E402
from ea4llm_pool.config import load as load_config  # noqa: E402
from ea4llm_pool.data import SampleSet  # noqa: E402
from ea4llm_pool.es.fitness import fitness_sums  # noqa: E402
from ea4llm_pool.es.groups import GROUPS, group_of  # noqa: E402


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--run", required=True, help="run directory")
    ap.add_argument("--at", type=int, default=None, help="checkpoint step to compare against (default: the last)")
    ap.add_argument("--last", type=number_list(int, 2, what="integers"), default=[2, 4, 8, 16], help="K for the uniform means of the last K checkpoints")
    ap.add_argument("--ema", type=number_list(float), default=[0.5, 0.8, 0.9], help="EMA decays β per checkpoint")
    ap.add_argument("--along", type=number_list(int, 1, what="integers"), default=[1, 2, 5], help="checkpoints back that set the line's direction")
    ap.add_argument("--scales", type=number_list(float), default=[-1, -0.5, 0.5, 1, 2], help="steps s along the line")
    run_main(ap, run_bench)


def run_bench(args) -> None:
    torch.set_num_threads(1)
    root = Path(args.run)
    if not (root / "config.yaml").is_file():
        raise UserError(f"--run: {root} holds no run (no config.yaml)")
    cfg = load_config(root / "config.yaml")
    found = list_checkpoints(root)
    if not found:
        raise UserError(f"{root} has no checkpoint")
    steps = [s for s, _ in found]
    at = steps[-1] if args.at is None else args.at
    if at not in steps:
        raise UserError(f"no checkpoint at step {at} (there are: {', '.join(map(str, steps))})")
    upto = [(s, d) for s, d in found if s <= at]
    heldout = SampleSet.load(root / "data" / "heldout.npz")
    ids, mask = heldout.batch(range(min(len(heldout), cfg.run.eval_samples)))
    model = load_model_skeleton(upto[-1][1])
    live = dict(model.named_parameters())
    states = [{n: t.float() for n, t in weight_tensors(d).items() if n in live} for _, d in upto]

    def loss(state: dict) -> float:
        for n, p in live.items():
            p.data.copy_(state[n].view(p.shape))
        total, count = fitness_sums(model, ids, mask, cfg.es.micro_batch)
        return -total / count

    theta = states[-1]
    print(f"run {root}: {len(upto)} checkpoints up to step {at}; held-out on {ids.shape[0]} windows")
    print(f"checkpoint {at}: {loss(theta):.4f}")
    for k in args.last:
        if k <= len(states):
            mean = {n: sum(s[n] for s in states[-k:]) / k for n in theta}
            print(f"mean of the last {k} checkpoints (steps {upto[-k][0]}–{at}): {loss(mean):.4f}")
    for beta in args.ema:
        ema = {n: t.clone() for n, t in states[0].items()}
        for s in states[1:]:
            for n in ema:
                ema[n] = beta * ema[n] + (1 - beta) * s[n]
        print(f"EMA β={beta:g} per checkpoint: {loss(ema):.4f}")
    base = loss(theta)
    for back in args.along:
        if back < len(states):
            prev = states[-1 - back]
            moves = []
            for sc in args.scales:
                moves.append(f"{sc:+g}: {loss({n: theta[n] + sc * (theta[n] - prev[n]) for n in theta}) - base:+.4f}")
            print(f"along θ_{at} − θ_{upto[-1 - back][0]} (loss change): " + ", ".join(moves))
    first = states[0]
    print("| group | weight RMS at the first checkpoint | at step " + str(at) + " | RMS of the change |")
    print("|---|---|---|---|")
    for g in GROUPS:
        names = [n for n in theta if group_of(n) == g]
        if not names:
            continue
        count = sum(theta[n].numel() for n in names)

        def rms(f) -> float:
            return (sum(float(f(n).double().pow(2).sum()) for n in names) / count) ** 0.5

        print(f"| {g} | {rms(lambda n: first[n]):.4f} | {rms(lambda n: theta[n]):.4f} | "
              f"{rms(lambda n: theta[n] - first[n]):.4f} |")


if __name__ == "__main__":
    main()
