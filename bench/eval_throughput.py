"""Member evaluation throughput: ``Replica.evaluate_member`` against a plain no-grad forward.

    python bench/eval_throughput.py [--preset small] [--micro-batch 16] [--seq-len 256] [--m 64]
                                    [--dtype fp32] [--threads 0] [--repeats 3]

One member's evaluation is: rebuild the working copy (cast(master + σ·ε), tensor by tensor) and
run the fitness (forward pass + sliced log-softmax + label gather) over the iteration's subset.
The baseline is ``with torch.no_grad(): model(input_ids, attention_mask)`` on the same model and
the same micro-batches, which computes the logits and nothing else. Two cases: a subset of one
micro-batch (rebuild cost paid per 16 samples: worst case) and a subset of M samples in several
micro-batches (rebuild paid once per member, as in a real iteration). Tokens/s count every input
token of every micro-batch; the ratio column is evaluate_member / plain forward (target ≥ 0.85×).
Prints a markdown table for the README.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from ea4llm_pool import quiet_transformers  # noqa: E402
from ea4llm_pool.config import load  # noqa: E402
from ea4llm_pool.es.fitness import fitness_sums  # noqa: E402
from ea4llm_pool.es.perturb import write_member  # noqa: E402
from ea4llm_pool.model import build_model, count_parameters  # noqa: E402
from ea4llm_pool.replica import Replica  # noqa: E402
from timing import best_seconds  # noqa: E402

VOCAB = 1024



def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small", choices=["tiny", "small", "paper-1b"])
    ap.add_argument("--micro-batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--m", type=int, default=64, help="samples per member in the multi-micro-batch case")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    quiet_transformers()
    if args.threads:
        torch.set_num_threads(args.threads)

    cfg = load(overrides=[f"model.preset={args.preset}", "es.sigma=0.01"])
    model = build_model(cfg, vocab_size=VOCAB, pad_token_id=0)
    n_params = count_parameters(model)
    rep = Replica(model, cfg.es, args.device, args.dtype)
    dev = rep.device
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, VOCAB, (args.m, args.seq_len), generator=g)
    mask = torch.ones_like(ids)
    ids_d, mask_d = ids.to(dev), mask.to(dev)
    mb = args.micro_batch

    def plain(n: int):
        def fn():
            with torch.no_grad():
                for s in range(0, n, mb):
                    rep.model(input_ids=ids_d[s: s + mb], attention_mask=mask_d[s: s + mb])
            sync()
        return fn

    def member(n: int):
        def fn():
            rep.evaluate_member(987654321, +1, 0.01, ids[:n], mask[:n], mb)
            sync()
        return fn

    def rebuild():
        write_member(rep.master, rep.working, rep.noise, 987654321, +1, 0.01, rep.group_sigma)
        sync()

    def fitness(n: int):
        def fn():
            fitness_sums(rep.model, ids_d[:n], mask_d[:n], mb)
            sync()
        return fn

    t_rebuild = best_seconds(rebuild, args.repeats)
    rows = []
    for label, n in ((f"1 micro-batch ({mb}×{args.seq_len})", mb),
                     (f"M = {args.m} samples ({args.m // mb} micro-batches)", args.m)):
        tokens = n * args.seq_len
        t_plain = best_seconds(plain(n), args.repeats)
        t_member = best_seconds(member(n), args.repeats)
        t_fit = best_seconds(fitness(n), args.repeats)
        rows.append((label, tokens, t_plain, t_member, t_fit))

    print(f"member evaluation, preset {args.preset} ({n_params:,} parameters, vocab {VOCAB}), {args.dtype} on "
          f"{dev}, {torch.get_num_threads()} threads; torch {torch.__version__}, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; best of {args.repeats}\n")
    print("| subset per member | plain forward (tok/s) | evaluate_member (tok/s) | ratio | "
          "of which rebuild (ms) | fitness only (tok/s) |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, tokens, t_plain, t_member, t_fit in rows:
        print(f"| {label} | {tokens / t_plain:,.0f} | {tokens / t_member:,.0f} | {t_plain / t_member:.2f}× | "
              f"{1e3 * t_rebuild:.1f} | {tokens / t_fit:,.0f} |")


if __name__ == "__main__":
    main()
