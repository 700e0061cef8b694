"""What a run reports: metrics.jsonl always, loss.png as the run goes, TensorBoard when installed.

Sinks share one method, ``log(record)``; the reporter fans a record out to all of them.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path


class JsonlSink:
    def __init__(self, path: Path):
        self.path = Path(path)
        self._fh = open(self.path, "a", buffering=1)

    def log(self, record: dict) -> None:
        self._fh.write(json.dumps(record, sort_keys=True) + "\n")

    def close(self) -> None:
        self._fh.close()


class LossPlot:
    """Redraws loss.png (train loss per iteration, held-out loss where evaluated).

    A redraw costs a few hundred milliseconds, so it happens at most every ``min_interval_s``
    seconds while the run goes (the first held-out point is drawn at once), and on close.
    """

    def __init__(self, path: Path, min_interval_s: float = 20.0):
        self.path = Path(path)
        self.min_interval_s = min_interval_s
        self.train: list[tuple[int, float]] = []
        self.heldout: list[tuple[int, float]] = []
        self._last = None

    def log(self, record: dict) -> None:
        it = record.get("iteration")
        if it is None:
            return
        if record.get("train_loss") is not None:
            self.train.append((it, record["train_loss"]))
        if record.get("heldout_loss") is not None:
            self.heldout.append((it, record["heldout_loss"]))
        now = time.monotonic()
        if (self._last is None and self.heldout) or (self._last is not None and now - self._last >= self.min_interval_s):
            self.draw()
            self._last = time.monotonic()

    def draw(self) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
        if self.train:
            ax.plot(*zip(*self.train), lw=0.8, alpha=0.6, label="train (mean over members)")
        if self.heldout:
            ax.plot(*zip(*self.heldout), "o-", ms=3, lw=1.6, label="held-out")
        ax.set_xlabel("iteration")
        ax.set_ylabel("loss (nats per token)")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        tmp = self.path.with_name(self.path.stem + ".tmp.png")
        fig.savefig(tmp)
        plt.close(fig)
        os.replace(tmp, self.path)

    def close(self) -> None:
        if self.train or self.heldout:
            self.draw()


class TensorBoardSink:
    def __init__(self, logdir: Path):
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

        self.writer = SummaryWriter(str(logdir))

    def log(self, record: dict) -> None:
        it = record.get("iteration", 0)
        for k, v in record.items():
            if k != "iteration" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                self.writer.add_scalar(k, v, it)

    def close(self) -> None:
        self.writer.close()


class Reporter:
    def __init__(self, out: Path, tensorboard: bool = True):
        out = Path(out)
        self.sinks: list = [JsonlSink(out / "metrics.jsonl"), LossPlot(out / "loss.png")]
        if tensorboard:
            try:
                self.sinks.append(TensorBoardSink(out / "tb"))
            except ImportError:
                pass

    def log(self, record: dict) -> None:
        for s in self.sinks:
            s.log(record)

    def close(self) -> None:
        for s in self.sinks:
            s.close()
