"""How much of the gradient one ES iteration can see, measured at a run's checkpoints.

    python bench/es_signal.py --run DIR [--steps 0,300] [--samples 8,16,32,64,128] [--repeats 6]
                              [--reference 1024] [--members 30] [--sigma S[,S…]] [--curvature-samples 128]
                              [--hutchinson 8] [--seed 0]

With members sharing the iteration's M samples, ES estimates the gradient of *those samples* from
N random directions: ĝ ∝ Σ_j z_j ε_j. Two measured factors bound how much of the training-set
gradient ∇F one iteration delivers (docs/experiments.md, "What limits ES here"):

- **a = cos(∇F_B, ∇F)**: how well the gradient of M samples points along the gradient of the
  training set (backprop; the reference gradient is the mean over --reference samples disjoint
  from the batches). For a noisy batch gradient a² ≈ M/(M + M0); M0 is fitted (the finite reference
  is accounted for) and printed. The expected descent of one z-scored ES step is ∝ a²·N, its cost
  ∝ N·M, so the descent per forward token is ∝ a²/M = 1/(M + M0): samples beyond M0 cost more
  than they return, fewer samples per member return little more per token while M ≪ M0.
- **ρ**: the correlation between the members' fitness values and their linear prediction
  σ·ε_j·∇F_B on the same samples (plain members: F(θ+σε); antithetic pairs: F(θ+σε) − F(θ−σε)).
  ρ² is the share of the shaped weights' variance that carries the gradient, 1 − ρ² is curvature
  and rounding. A pair costs two forwards for one direction, so antithetic pairs pay only when
  ρ_antithetic² > 2·ρ_plain².

- **Per-group gradient against curvature**: |∇F_g|² and a Hutchinson estimate of tr(H_g) for each
  parameter group (emb, attn, mlp, ln, head). A z-scored ES step descends ∝ Σ_g p_g|∇F_g|² and pays
  ∝ Σ_g p_g·tr(H_g) for group multipliers p_g (σ_g·α_g), so per-group multipliers can only help
  as far as these ratios differ between groups.

The perturbations are torch's own Gaussian (or ±1) draws scaled by σ·σ_g, not the run's seeded
noise: the statistics, not the bits, are what is measured. The fitness is the run's log-prob
(Eq. 2–3) in fp32; a run with a fitness plugin is measured on the log-prob.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from entry import number_list, parser, run_main  # noqa: E402
from ea4llm_pool import UserError  # noqa: E402
from ea4llm_pool.checkpoint import list_checkpoints  # noqa: E402
from ea4llm_pool.config import load as load_config  # noqa: E402
from ea4llm_pool.data import SampleSet  # noqa: E402
from ea4llm_pool.es.fitness import sample_rewards  # noqa: E402
from ea4llm_pool.es.groups import GROUPS, group_of  # noqa: E402

CHUNK = 128  # samples per backward pass


def mean_fitness(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """F_B with autograd: the mean over samples of each sample's mean next-token log-probability."""
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    lp = torch.log_softmax(logits, dim=-1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    m = (mask[:, :-1] * mask[:, 1:]).to(torch.float32)
    return ((lp * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)).mean()


def gradient(model, params, train: SampleSet, idx: list[int]) -> torch.Tensor:
    """∇F over the samples ``idx`` (flattened), in chunks weighted by their size."""
    total = torch.zeros(sum(p.numel() for p in params))
    for s in range(0, len(idx), CHUNK):
        part = idx[s: s + CHUNK]
        ids, mask = train.batch(part)
        with torch.enable_grad():
            grads = torch.autograd.grad(mean_fitness(model, ids.long(), mask.long()), params)
        total += torch.cat([g.reshape(-1) for g in grads]) * (len(part) / len(idx))
    return total


def fit_m0(ms: list[int], cos: list[float], reference: int) -> float:
    """M0 of cos(∇F_B, ∇F_ref) = √(M/(M+M0)) · √(R/(R+M0)) (independent batch and reference noise),
    by least squares over a log grid."""
    grid = np.exp(np.linspace(math.log(0.1), math.log(1e6), 4000))
    m = np.array(ms, dtype=float)[:, None]
    pred = np.sqrt(m / (m + grid)) * np.sqrt(reference / (reference + grid))
    err = ((pred - np.array(cos)[:, None]) ** 2).sum(axis=0)
    return float(grid[int(err.argmin())])


def correlations(model, params, es, train: SampleSet, idx: list[int], grad_b: torch.Tensor,
                 members: int, sigma: float, gen: torch.Generator) -> tuple[float, float]:
    """ρ of plain members and of antithetic pairs against σ·ε·∇F_B, on the samples ``idx``."""
    ids, mask = train.batch(idx)
    ids, mask = ids.long(), mask.long()
    base = [p.detach().clone() for p in params]
    scale = [sigma * getattr(es.group_sigma, group_of(n)) for n, _ in model.named_parameters()]
    plus, minus, linear = [], [], []
    for _ in range(members):
        eps = [torch.randn(p.shape, generator=gen) for p in params]
        if es.noise == "rademacher":
            eps = [e.sign() for e in eps]
        flat = torch.cat([(e * s).reshape(-1) for e, s in zip(eps, scale)])
        linear.append(float(flat @ grad_b))
        for sign, out in ((1.0, plus), (-1.0, minus)):
            for p, b, e, s in zip(params, base, eps, scale):
                p.data.copy_(b + sign * s * e)
            out.append(float(sample_rewards(model, ids, mask).mean()))
    for p, b in zip(params, base):
        p.data.copy_(b)
    lin = np.array(linear)
    rho_plain = float(np.corrcoef(np.array(plus), lin)[0, 1])
    rho_anti = float(np.corrcoef(np.array(plus) - np.array(minus), lin)[0, 1])
    return rho_plain, rho_anti


def curvature(model, params, train: SampleSet, idx: list[int], g_ref: torch.Tensor, draws: int,
              gen: torch.Generator) -> None:
    """Per group: |∇F_g|² of the reference gradient and tr(H_g) = E[εᵀHε] over Gaussian ε restricted
    to the group (Hutchinson, ``draws`` Hessian-vector products on the samples ``idx``)."""
    names = [n for n, _ in model.named_parameters()]
    groups = [group_of(n) for n in names]
    sizes = [p.numel() for p in params]
    ids, mask = train.batch(idx)
    trace = {g: 0.0 for g in GROUPS}
    with torch.enable_grad():
        grads = torch.autograd.grad(mean_fitness(model, ids.long(), mask.long()), params, create_graph=True)
        for _ in range(draws):
            eps = [torch.randn(p.shape, generator=gen) for p in params]
            hv = torch.autograd.grad(sum((g * e).sum() for g, e in zip(grads, eps)), params, retain_graph=True)
            for grp, e, h in zip(groups, eps, hv):
                # the fitness is maximised: the loss Hessian is −H(F)
                trace[grp] -= float((e * h).sum()) / draws
    sq = {g: 0.0 for g in GROUPS}
    off = 0
    for grp, k in zip(groups, sizes):
        sq[grp] += float(g_ref[off: off + k].pow(2).sum())
        off += k
    print(f"| group | parameters | |∇F_g|² | tr(H_g) of the loss ({draws} draws, {len(idx)} samples) | ratio |")
    print("|---|---|---|---|---|")
    for g in GROUPS:
        n = sum(k for grp, k in zip(groups, sizes) if grp == g)
        if n:
            ratio = f"{sq[g] / trace[g]:.3g}" if trace[g] > 0 else "(tr ≤ 0: indefinite)"
            print(f"| {g} | {n:,} | {sq[g]:.3g} | {trace[g]:.3g} | {ratio} |")


def measure(ckpt: Path, step: int, cfg, train: SampleSet, args) -> None:
    from transformers import AutoModelForCausalLM

    try:
        # eager attention: the curvature estimate differentiates twice
        model = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32,
                                                     attn_implementation="eager").eval()
    except Exception as err:  # transformers raises many types for a bad directory
        raise UserError(f"cannot load model from {ckpt}: {str(err).splitlines()[0]}") from None
    params = [p for p in model.parameters()]
    for p in params:
        p.requires_grad_(True)
    gen = torch.Generator().manual_seed(args.seed + step)
    order = torch.randperm(len(train), generator=gen).tolist()
    ref_idx, pool = order[:args.reference], order[args.reference:]
    biggest = max(args.samples)
    if len(pool) < biggest:
        raise UserError(f"{len(train)} training samples leave {len(pool)} beside a reference of "
                        f"{args.reference}: fewer than --samples {biggest}; lower --reference")
    t0 = time.perf_counter()
    g_ref = gradient(model, params, train, ref_idx)
    print(f"\nstep {step} ({ckpt.name}): |∇F| over {len(ref_idx)} reference samples = {g_ref.norm():.4g}")
    print("| M (samples) | cos(∇F_B, ∇F_ref), mean of repeats | sd |")
    print("|---|---|---|")
    cos_means = []
    grad_at_m = None
    for m in args.samples:
        cs = []
        for _ in range(args.repeats):
            pick = torch.randperm(len(pool), generator=gen)[:m].tolist()
            g = gradient(model, params, train, [pool[i] for i in pick])
            cs.append(float(torch.nn.functional.cosine_similarity(g, g_ref, dim=0)))
            if m == cfg.es.samples_per_iteration and grad_at_m is None:
                grad_at_m = (g, [pool[i] for i in pick])
        cos_means.append(float(np.mean(cs)))
        print(f"| {m} | {np.mean(cs):.3f} | {np.std(cs):.3f} |")
    m0 = fit_m0(args.samples, cos_means, len(ref_idx))
    m_run = cfg.es.samples_per_iteration
    a2 = m_run / (m_run + m0)
    half, double = max(m_run // 2, 1), 2 * m_run
    print(f"fitted M0 = {m0:.0f} samples: at the run's M = {m_run}, a² = M/(M+M0) = {a2:.2f}. Descent per "
          f"forward token ∝ 1/(M+M0) (step size retuned for each M): against M = {m_run}, M = {half} returns "
          f"{(m_run + m0) / (half + m0):.2f}× and M = {double} returns {(m_run + m0) / (double + m0):.2f}× per token")
    if grad_at_m is None:
        pick = torch.randperm(len(pool), generator=gen)[:m_run].tolist()
        idx = [pool[i] for i in pick]
        grad_at_m = (gradient(model, params, train, idx), idx)
    curvature(model, params, train, pool[:args.curvature_samples], g_ref, args.hutchinson, gen)
    for p in params:
        p.requires_grad_(False)
    for sigma in args.sigma or [cfg.es.sigma]:
        # the same directions for every σ, so the values compare σ and not the draws
        draws = torch.Generator().manual_seed(args.seed + step + 1)
        rho_plain, rho_anti = correlations(model, params, cfg.es, train, grad_at_m[1], grad_at_m[0],
                                           args.members, sigma, draws)
        verdict = "pay" if rho_anti ** 2 > 2 * rho_plain ** 2 else "do not pay"
        print(f"σ = {sigma:g}, {args.members} members on M = {m_run} samples: "
              f"ρ plain = {rho_plain:.3f}, ρ antithetic = {rho_anti:.3f} → antithetic pairs {verdict} here "
              f"(ρ_a² = {rho_anti ** 2:.2f} against 2·ρ_p² = {2 * rho_plain ** 2:.2f})")
    print(f"{time.perf_counter() - t0:.0f} s")


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--run", required=True, help="run directory (its config, data and checkpoints are read)")
    ap.add_argument("--steps", type=number_list(int, 0, what="integers"), default=None, metavar="S[,S…]",
                    help="checkpoint steps to measure (default: the first and the last)")
    ap.add_argument("--samples", type=number_list(int, 1, what="integers"), default=[8, 16, 32, 64, 128], metavar="M[,M…]",
                    help="batch sizes whose gradient is compared with the reference")
    ap.add_argument("--repeats", type=int, default=6, help="batches drawn per size")
    ap.add_argument("--reference", type=int, default=1024, help="samples in the reference gradient")
    ap.add_argument("--members", type=int, default=30, help="members (and pairs) for ρ")
    ap.add_argument("--sigma", type=number_list(float, 0, strict=True), default=None, metavar="S[,S…]",
                    help="σ values for ρ, same directions for each (default: the run's es.sigma)")
    ap.add_argument("--curvature-samples", type=int, default=128, help="samples of the curvature estimate")
    ap.add_argument("--hutchinson", type=int, default=8, help="Hessian-vector products per curvature estimate")
    ap.add_argument("--seed", type=int, default=0, help="seed of the draws")
    run_main(ap, run_bench)


def run_bench(args) -> None:
    torch.set_num_threads(1)
    if min(args.repeats, args.reference, args.curvature_samples, args.hutchinson, min(args.samples)) < 1 \
            or args.members < 3:
        raise UserError("--repeats, --reference, --curvature-samples, --hutchinson and --samples must be >= 1, "
                        "--members >= 3")
    root = Path(args.run)
    if not (root / "config.yaml").is_file():
        raise UserError(f"--run: {root} holds no run (no config.yaml)")
    cfg = load_config(root / "config.yaml")
    train = SampleSet.load(root / "data" / "train.npz")
    found = dict(list_checkpoints(root))
    if not found:
        raise UserError(f"{root} has no checkpoint")
    steps = args.steps if args.steps is not None else sorted({min(found), max(found)})
    missing = [s for s in steps if s not in found]
    if missing:
        raise UserError(f"no checkpoint at step {missing[0]} (there are: {', '.join(map(str, sorted(found)))})")
    print(f"run {root}: {len(train)} training samples of {train.seq_len} tokens; "
          f"population {cfg.es.population}, M = {cfg.es.samples_per_iteration}, σ = {cfg.es.sigma:g}")
    for s in steps:
        measure(found[s], s, cfg, train, args)


if __name__ == "__main__":
    main()
