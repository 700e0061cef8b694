"""The baselines' training loop: budget in forward tokens or seconds, held-out points, resume.

A point of the curve is ``{"step", "tokens", "wall_s", "heldout_loss", "train_loss"}``, the same
shape the experiment builds for ES runs. ``tokens`` counts forward-token evaluations of training
(a backprop step counts its tokens 3 times, a MeZO step twice); held-out evaluations are
measurement and count towards neither tokens nor, for fairness with ES, anything but wall time.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from .common import batch_at, eval_loss

STATE = "state.pt"
CURVE = "curve.jsonl"


@dataclass(frozen=True)
class Budget:
    tokens: Optional[int] = None     # forward-token evaluations
    seconds: Optional[float] = None  # wall-clock seconds of training (held-out evaluations included)

    def __post_init__(self):
        if (self.tokens is None) == (self.seconds is None):
            raise ValueError("a budget is either tokens or seconds")


def read_curve(out: Path, upto_step: Optional[int] = None) -> list[dict]:
    path = Path(out) / CURVE
    if not path.is_file():
        return []
    points = []
    for line in path.read_text().splitlines():
        try:
            p = json.loads(line)
        except ValueError:
            continue  # a line cut by a crash
        if upto_step is None or p["step"] <= upto_step:
            points.append(p)
    return points


def _write_curve(out: Path, points: list[dict]) -> None:
    tmp = out / (CURVE + ".tmp")
    tmp.write_text("".join(json.dumps(p) + "\n" for p in points))
    os.replace(tmp, out / CURVE)


def run_baseline(trainer, forwards_per_step: int, train, ids_heldout: torch.Tensor, mask_heldout: torch.Tensor, *,
                 batch: int, seed: int, budget: Budget, eval_every: int, checkpoint_every: int, micro_batch: int,
                 out: Path, eval_every_s: float = 0.0, stop: Optional[Callable[[], bool]] = None,
                 say: Callable[[str], None] = print) -> dict:
    """Train until the budget is spent (or ``stop()``); resumes from ``out/state.pt`` when it exists.

    Held-out points every ``eval_every`` steps, or, when that is 0 (a budget in seconds, where the
    number of steps is unknown), every ``eval_every_s`` seconds."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    step, tokens, wall = 0, 0, 0.0
    if (out / STATE).is_file():
        state = torch.load(out / STATE, weights_only=True)
        trainer.load_state_dict(state["trainer"])
        step, tokens, wall = int(state["step"]), int(state["tokens"]), float(state["wall_s"])
        say(f"resumed at step {step} ({tokens:,} tokens, {wall:.1f} s)")
    points = read_curve(out, upto_step=step)  # points after the last save are computed again
    t0 = time.perf_counter() - wall

    def elapsed() -> float:
        return time.perf_counter() - t0

    def evaluate(train_loss: Optional[float]) -> None:
        loss = eval_loss(trainer.model, ids_heldout, mask_heldout, micro_batch)
        points.append({"step": step, "tokens": tokens, "wall_s": round(elapsed(), 3), "heldout_loss": loss,
                       "train_loss": train_loss})
        _write_curve(out, points)

    def save() -> None:
        tmp = out / (STATE + ".tmp")
        torch.save({"trainer": trainer.state_dict(), "step": step, "tokens": tokens, "wall_s": elapsed()}, tmp)
        os.replace(tmp, out / STATE)

    if not points:
        evaluate(None)
        points[0]["wall_s"] = 0.0  # the clock starts after the start evaluation, as for ES runs
        t0 = time.perf_counter()
    next_eval_s = points[-1]["wall_s"] + eval_every_s
    losses: list[float] = []
    stopped = "budget"
    while True:
        if stop is not None and stop():
            stopped = "interrupted"
            break
        ids, mask = batch_at(train, batch, seed, step)
        cost = forwards_per_step * int(mask.sum())
        if budget.tokens is not None and tokens + cost > budget.tokens:
            break
        if budget.seconds is not None and elapsed() >= budget.seconds:
            break
        losses.append(trainer.step(ids, mask))
        step += 1
        tokens += cost
        if not math.isfinite(losses[-1]):
            stopped = "diverged"
            break
        if (eval_every and step % eval_every == 0) or (not eval_every and elapsed() >= next_eval_s):
            evaluate(sum(losses) / len(losses))
            losses = []
            next_eval_s = points[-1]["wall_s"] + eval_every_s
        if step % checkpoint_every == 0:
            save()
    if points[-1]["step"] != step:
        evaluate(sum(losses) / len(losses) if losses else None)
    save()
    return {"steps": step, "tokens": tokens, "wall_s": elapsed(), "stopped": stopped}
