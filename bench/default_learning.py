"""Does the default run visibly learn? Held-out loss against wall-clock time of `ea4llm-pool train`.

    python bench/default_learning.py [--out DIR] [--minutes 5] [extra train arguments ...]

Runs the README's main job (`ea4llm-pool train`, the embedded default: a coordinator and two
local worker processes) as a user would, timing it from the command's start, and reads
metrics.jsonl: the held-out loss at the start, the first evaluation at least 0.5 nats below it and
when that came (seconds since the command started, start-up included), the loss reached within
--minutes, and the final loss. The curve is in OUT/loss.png.

Target: held-out loss at least 0.5 nats below its starting value within 5 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="run directory (default: a temporary one, kept)")
    ap.add_argument("--minutes", type=float, default=5.0)
    args, extra = ap.parse_known_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="ea4llm-default-")) / "run"
    t0 = time.monotonic()
    res = subprocess.run([sys.executable, "-m", "ea4llm_pool", "train", "--out", str(out), *extra],
                         capture_output=True, text=True)
    total = time.monotonic() - t0
    if res.returncode != 0:
        sys.exit(f"train failed:\n{res.stderr[-2000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    start = rows[0]["heldout_loss"]
    evals = [r for r in rows if r.get("heldout_loss") is not None and r.get("wall_s") is not None]
    # wall_s counts from when the run began reporting. Everything outside it (start-up: data,
    # tokenizer, model, worker processes; and shutdown) is added as if it all came first, so the
    # times below are from the command's start and, if anything, late.
    startup = total - evals[-1]["wall_s"]
    hit = next((r for r in evals if start - r["heldout_loss"] >= 0.5), None)
    within = [r for r in evals if r["wall_s"] + startup <= 60 * args.minutes]
    print(f"held-out loss at start            {start:.3f}")
    if hit:
        print(f"first evaluation 0.5 nats lower   {hit['heldout_loss']:.3f} at iteration {hit['iteration']}, "
              f"{hit['wall_s'] + startup:.0f} s after the command started")
    else:
        print("never 0.5 nats lower")
    if within:
        best = within[-1]
        print(f"within {args.minutes:g} minutes                  {best['heldout_loss']:.3f} at iteration "
              f"{best['iteration']} (drop {start - best['heldout_loss']:.3f} nats)")
    print(f"final                             {evals[-1]['heldout_loss']:.3f} at iteration {evals[-1]['iteration']}, "
          f"command took {total:.0f} s")
    print(f"curve: {out / 'loss.png'}")


if __name__ == "__main__":
    main()
