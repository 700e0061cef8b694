"""The run: config, data, tokenizer, commit log, checkpoints and metrics, owned by the coordinator.

``Run`` plans each iteration (members, subset, α_t, σ_t — pure functions of the run seed and t, so
a resumed run hands out the same work), closes it from the members' fitness values (shaping →
commit record → applied to the coordinator's own replica → appended to the log and fsynced), and
reports. θ_t = checkpoint_K + replay(commits K+1 … t) is how every party recovers, including this
one after ``--resume``.
"""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from . import UserError, checkpoint
from .checkpoint import load_model_skeleton
from .config import Config, load as load_config
from .es.commit import close_iteration
from .plan import Plan, plan_iteration
from .replica import Replica

LOG_NAME = "commits.jsonl"


class Diverged(UserError):
    """The held-out loss is no longer a number: stop the run (it is checkpointed first)."""


def build_components(cfg: Config, out: Path, say: Callable[[str], None]):
    """Corpus → tokenizer → samples → model for a new run; saves tokenizer and samples in ``out``."""
    from .data import check_subset, load_texts, prepare_samples
    from .model import build_model, check_seq_len
    from .tokenizer import load_tokenizer

    t0 = time.perf_counter()
    texts = load_texts(cfg)
    tok = load_tokenizer(cfg, texts)
    # The model before the samples: a seq_len the model cannot take is the error to report, not
    # the "corpus too small" that windowing at that length would run into first.
    model = build_model(cfg, vocab_size=len(tok), pad_token_id=tok.pad_token_id)
    check_seq_len(model, cfg.data.seq_len)
    train, heldout = prepare_samples(cfg, tok, texts)
    check_subset(cfg, len(train))
    tok.save_pretrained(out / "tokenizer")
    (out / "data").mkdir(exist_ok=True)
    train.save(out / "data" / "train.npz")
    heldout.save(out / "data" / "heldout.npz")
    say(f"data: {len(train)} train / {len(heldout)} held-out samples of {cfg.data.seq_len} tokens, "
        f"vocab {len(tok)} ({time.perf_counter() - t0:.1f} s to prepare)")
    return tok, train, heldout, model


class Run:
    def __init__(self, cfg: Optional[Config], out: str | Path, resume: bool = False, device: str = "cpu",
                 iterations: Optional[int] = None, say: Callable[[str], None] = print, writer: bool = True):
        """``writer``: this process appends to the commit log (in-process training). The pool's
        reference replica is not the writer: the coordinator appends, and hands it each record
        (:meth:`follow`)."""
        from .data import SampleSet
        from .runlog import CommitLog

        self.out = Path(out)
        self.say = say
        log_path = self.out / LOG_NAME
        if resume:
            if not (self.out / "config.yaml").is_file():
                raise UserError(f"--resume: {self.out} holds no run (no config.yaml)")
            self.cfg = load_config(self.out / "config.yaml")
            if iterations is not None:
                self.cfg.run.iterations = iterations
        else:
            if cfg is None:
                raise ValueError("a new run needs a config")
            if (log_path.exists() and log_path.stat().st_size) or (self.out / "checkpoints").exists():
                raise UserError(f"{self.out} already holds a run; pass --resume to continue it, or choose another --out")
            self.cfg = cfg
            if iterations is not None:
                self.cfg.run.iterations = iterations
            self.out.mkdir(parents=True, exist_ok=True)
        self.config_yaml = self.cfg.to_yaml()
        (self.out / "config.yaml").write_text(self.config_yaml)
        es = self.cfg.es

        if resume:
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(str(self.out / "tokenizer"))
            self.train = SampleSet.load(self.out / "data" / "train.npz")
            self.heldout = SampleSet.load(self.out / "data" / "heldout.npz")
            found = checkpoint.list_checkpoints(self.out)
            if not found:
                raise UserError(f"--resume: {self.out} has no checkpoint to resume from")
            ckpt = found[-1][1]
            model = load_model_skeleton(ckpt)
        else:
            self.tokenizer, self.train, self.heldout, model = build_components(self.cfg, self.out, say)
            ckpt = None
        self.replica = Replica(model, es, device=device, dtype="fp32", chunk=self.cfg.runtime.chunk_elements,
                               compile=self.cfg.runtime.compile, say=say)
        self.writer = writer
        if writer:
            self.log = CommitLog(log_path)
        else:
            self.log = CommitLog(log_path, readonly=True) if log_path.is_file() else None
        self.known: dict[int, str] = {}
        self.last_chain = ""  # the chain value of the last commit applied (recorded in checkpoints)
        if ckpt is None:
            self.checkpoint(final=False)
            self.known[0] = self.state_hash
        else:
            checkpoint.load_master_into(ckpt, self.replica.master)
            meta = checkpoint.read_meta(ckpt)
            if self.replica.state_hash() != meta["state_hash"]:
                raise UserError(f"{ckpt}: weights do not match the state hash recorded beside them")
            self.known[self.step] = meta["state_hash"]
            replayed = self.replay_log()
            say(f"resumed from {ckpt.name} + {replayed} logged commits → iteration {self.step}")
        self.ids_heldout, self.mask_heldout = self.heldout.batch(range(min(len(self.heldout), self.cfg.run.eval_samples)))

    # -- state -----------------------------------------------------------------------------------
    @property
    def step(self) -> int:
        """Iterations completed (= commits applied)."""
        return self.replica.master.step

    @property
    def state_hash(self) -> str:
        """The replica's state hash, computed once per step (replay remembers it in ``known``)."""
        h = self.known.get(self.step)
        if h is None:
            h = self.known[self.step] = self.replica.state_hash()
        return h

    def replay_log(self) -> int:
        from .replay import ReplayMismatch, replay

        if self.log is None:
            return 0
        try:
            return replay(self.replica, self.log.records(from_iteration=self.step), self.known,
                          on_step=self._chained)
        except ReplayMismatch as err:
            raise UserError(f"{self.out / LOG_NAME}: {err}") from None

    def follow(self, record: dict) -> str:
        """Apply a commit the coordinator has logged (the reference replica); returns the new hash."""
        from .replay import replay

        replay(self.replica, [record], self.known, on_step=self._chained)
        return self.state_hash

    def _chained(self, record: dict, _hash: str) -> None:
        self.last_chain = record.get("chain", "")

    # -- one iteration -------------------------------------------------------------------------------
    def plan(self, t: int) -> Plan:
        return plan_iteration(self.cfg, len(self.train), t)

    def close(self, plan: Plan, rewards: list[float], stats: Optional[dict] = None) -> dict:
        """Shape, commit (log + fsync) and apply iteration ``plan.iteration``; returns the record."""
        if plan.iteration != self.step:
            raise RuntimeError(f"closing iteration {plan.iteration} but the state is at {self.step}")
        record = close_iteration(self.cfg.es, plan.iteration, plan.members, rewards, plan.alpha, plan.sigma,
                                 self.replica.master.step)
        self.replica.apply(record)
        self.known[self.step] = self.state_hash
        record["attest"] = {"step": self.step, "state_hash": self.state_hash}  # applied before it is written
        record["subset_digest"] = plan.subset_digest
        record["stats"] = dict(stats or {})
        record = self.log.append(record)
        self.last_chain = record["chain"]
        return record

    def heldout_loss(self) -> float:
        s, c = self.replica.evaluate_center(self.ids_heldout, self.mask_heldout, self.cfg.es.micro_batch)
        return -s / c

    def checkpoint(self, final: bool = False) -> Path:
        meta = {"state_hash": self.state_hash, "config_hash": self.cfg.config_hash(),
                "log_chain": self.last_chain, "final": final}
        return checkpoint.save(checkpoint.step_dir(self.out, self.step), self.replica.model, self.replica.master,
                               self.tokenizer, meta, self.config_yaml)

    def banner(self, workers: str) -> str:
        from .model import count_parameters, vocab_note

        es, d = self.cfg.es, self.cfg.data
        model = self.replica.model
        tokens = es.population * es.samples_per_iteration * d.seq_len
        vocab = vocab_note(self.cfg, model.config.vocab_size, len(self.tokenizer))
        return (f"ea4llm-pool: {count_parameters(model):,} parameters, {vocab} | population {es.population}"
                f"{' antithetic' if es.antithetic else ''} | {es.samples_per_iteration} samples × {d.seq_len} tokens"
                f" per member | {tokens:,} tokens/iteration | shaping {es.shaping} | optimizer {es.optimizer}"
                f" | σ={es.sigma:g} α={es.alpha:g} | {self.cfg.run.iterations} iterations | {workers}")

    def files_for_sync(self) -> tuple[Path, list[Path]]:
        """The latest checkpoint and the data files a joining worker needs."""
        ckpt = checkpoint.list_checkpoints(self.out)[-1][1]
        return ckpt, [self.out / "data" / "train.npz"]

    def remove_tmp(self) -> None:
        for d in (self.out / "checkpoints").glob("*.tmp"):
            shutil.rmtree(d, ignore_errors=True)

    # -- reporting -------------------------------------------------------------------------------
    def open_reporter(self):
        from .metrics import Reporter

        self.reporter = Reporter(self.out)
        self._t_report = time.monotonic()
        return self.reporter

    def report(self, record: dict, seconds: float, tokens: int, extra: Optional[dict] = None) -> dict:
        """Metrics line for a committed iteration; held-out eval and checkpoint when due."""
        step = self.step
        rewards = [r for r in record["rewards"] if math.isfinite(r)]  # non-finite ones are counted apart
        fit = sum(rewards) / len(rewards) if rewards else float("nan")
        line = {"iteration": step, "train_fitness": fit, "train_loss": -fit, "alpha": record["alpha"],
                "sigma": record["sigma"], "state_hash": self.state_hash, "seconds": seconds,
                "tokens_per_s": tokens / seconds if seconds > 0 else None, "heldout_loss": None,
                "wall_s": round(time.monotonic() - self._t_report, 3)}
        last = step >= self.cfg.run.iterations
        ev = self.cfg.run.eval_every
        if last or (ev and step % ev == 0):
            line["heldout_loss"] = self.heldout_loss()
            if not math.isfinite(line["heldout_loss"]):
                self.checkpoint(final=False)
                raise Diverged(f"held-out loss is {line['heldout_loss']} at iteration {step}: the model diverged; "
                               f"resume from an earlier checkpoint with a smaller es.alpha or es.sigma")
        if record.get("nonfinite"):
            line["nonfinite"] = record["nonfinite"]
        if extra:
            line.update(extra)
        if last or step % self.cfg.run.checkpoint_every == 0:
            self.checkpoint(final=last)
        self.reporter.log(line)
        return line

    def report_start(self) -> dict:
        line = {"iteration": self.step, "heldout_loss": self.heldout_loss(), "train_loss": None,
                "state_hash": self.state_hash, "event": "start"}
        self.reporter.log(line)
        return line
