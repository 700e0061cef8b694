"""Peak memory of an ES worker against inference alone and against an AdamW training step.

    python bench/memory.py [--configs small,big] [--batch 16] [--seq-len 256]

Each measurement runs in a fresh subprocess (so no allocator cache or earlier peak leaks between
them): import torch/transformers, reset the peak-RSS counter (``/proc/self/clear_refs``; falls back
to ``ru_maxrss``), take the current RSS as the baseline, then build the model and do one of:

* ``inference``: ``torch.no_grad()`` forward of one micro-batch (fp32) — the floor for anything
  that evaluates the model;
* ``worker``: the ES worker's footprint with the paper's update (``es.optimizer=sgd``) — a
  ``Replica`` (fp32 master + the model as working copy) evaluating one member on the same
  micro-batch (rebuild the working copy + fitness);
* ``worker-adam``: the same with ``es.optimizer=adam`` (the default config): every replica also
  keeps Adam's two fp32 moments, since it must apply the identical update;
* ``adamw``: two AdamW steps with backprop on the same micro-batch (weights + grads + 2 moments +
  saved activations).

Reported: peak RSS above the baseline, in MiB, and the ratios worker/inference (target ≤ 1.5×)
and worker/AdamW. Configs: ``small`` = the small preset (3.4M parameters, vocab 1024); ``big`` =
hidden 1024, 8 layers, intermediate 3072, 8 heads / 4 KV heads (≈102M parameters, vocab 1024).
Prints a markdown table for the README.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 1024
CONFIGS = {
    "small": ["model.preset=small"],
    "big": ["model.preset=small", "model.hidden_size=1024", "model.num_hidden_layers=8",
            "model.intermediate_size=3072", "model.num_attention_heads=8", "model.num_key_value_heads=4",
            "model.head_dim=128"],
}
MODES = ("inference", "worker", "worker-adam", "adamw")


def _status_kib(key: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{key}:\s+(\d+)\s+kB", text, re.M).group(1))


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def child(config: str, mode: str, batch: int, seq_len: int) -> None:
    sys.path.insert(0, str(ROOT))
    import torch

    from ea4llm_pool import quiet_transformers
    from ea4llm_pool.config import load
    from ea4llm_pool.model import build_model, count_parameters
    from ea4llm_pool.replica import Replica

    quiet_transformers()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, VOCAB, (batch, seq_len), generator=g)
    mask = torch.ones_like(ids)
    optimizer = "adam" if mode == "worker-adam" else "sgd"
    cfg = load(overrides=CONFIGS[config] + ["es.sigma=0.01", f"es.optimizer={optimizer}"])

    exact = _reset_peak()
    base = _status_kib("VmRSS") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    model = build_model(cfg, vocab_size=VOCAB, pad_token_id=0)
    n_params = count_parameters(model)
    if mode == "inference":
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
    elif mode in ("worker", "worker-adam"):
        rep = Replica(model, cfg.es, "cpu", "fp32")
        rep.evaluate_member(123456789, +1, 0.01, ids, mask, micro_batch=batch)
    elif mode == "adamw":
        model.train().requires_grad_(True)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        for _ in range(2):
            loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    else:
        raise SystemExit(f"unknown mode {mode}")
    peak = _status_kib("VmHWM") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"config": config, "mode": mode, "params": n_params, "peak_mib": (peak - base) / 1024,
                      "exact": exact, "seconds": time.perf_counter() - t0}))


def measure(config: str, mode: str, batch: int, seq_len: int) -> dict:
    r = subprocess.run([sys.executable, __file__, "--child", config, mode, "--batch", str(batch),
                        "--seq-len", str(seq_len)], capture_output=True, text=True, cwd=ROOT,
                       env=dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1"))
    if r.returncode != 0:
        raise SystemExit(f"{config}/{mode} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default="small,big")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--child", nargs=2, metavar=("CONFIG", "MODE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child[0], args.child[1], args.batch, args.seq_len)
        return

    results = {}
    for config in args.configs.split(","):
        for mode in MODES:
            results[config, mode] = r = measure(config, mode, args.batch, args.seq_len)
            print(f"  {config:<6} {mode:<10} peak +{r['peak_mib']:8.1f} MiB  ({r['seconds']:.1f} s)", file=sys.stderr)
    exact = all(r["exact"] for r in results.values())
    print(f"peak RSS above the post-import baseline ({'VmHWM after clear_refs' if exact else 'ru_maxrss'}), "
          f"one micro-batch of {args.batch}×{args.seq_len} tokens, fp32, CPU, each in a fresh process\n")
    print("| model | parameters | fp32 weights | inference | ES worker, sgd | ÷ inference | ES worker, adam "
          "| ÷ inference | AdamW backprop step | sgd worker ÷ AdamW |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for config in args.configs.split(","):
        inf, wk, wa, aw = (results[config, m]["peak_mib"] for m in MODES)
        p = results[config, "inference"]["params"]
        print(f"| {config} | {p:,} | {p * 4 / 2 ** 20:,.0f} MiB | {inf:,.0f} MiB | {wk:,.0f} MiB | {wk / inf:.2f}× | "
              f"{wa:,.0f} MiB | {wa / inf:.2f}× | {aw:,.0f} MiB | {wk / aw:.2f}× |")


if __name__ == "__main__":
    main()
