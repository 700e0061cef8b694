"""The run: config, data, tokenizer, commit log, checkpoints and metrics, owned by the coordinator.

``Run`` plans each iteration (members, subset, α_t, σ_t — pure functions of the run seed and t, so
a resumed run hands out the same work), closes it from the members' fitness values (shaping →
commit record → applied to the coordinator's own replica → appended to the log and fsynced), and
reports. θ_t = checkpoint_K + replay(commits K+1 … t) is how every party recovers, including this
one after ``--resume``.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from . import UserError, checkpoint
from .config import Config, load as load_config
from .es.commit import close_iteration
from .es.population import Member, population
from .es.schedule import alpha_at, sigma_at
from .replica import Replica

LOG_NAME = "commits.jsonl"


@dataclass(frozen=True)
class Plan:
    iteration: int
    alpha: float
    sigma: float
    members: list[Member]
    indices: list[int]
    subset_digest: str


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


def load_model_skeleton(ckpt: Path):
    """The checkpoint's architecture in fp32 (weights then overwritten bit-exactly from the master)."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32)
    except Exception as err:  # transformers raises many types for a bad directory
        raise UserError(f"cannot load model from {ckpt}: {str(err).splitlines()[0]}") from None
    return model.eval().requires_grad_(False)


class Run:
    def __init__(self, cfg: Optional[Config], out: str | Path, resume: bool = False, device: str = "cpu",
                 iterations: Optional[int] = None, say: Callable[[str], None] = print):
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
            if log_path.exists() or (self.out / "checkpoints").exists():
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
        self.replica = Replica(model, es, device=device, dtype="fp32", chunk=self.cfg.runtime.chunk_elements)
        self.log = CommitLog(log_path)
        if ckpt is None:
            self.checkpoint(final=False)
        else:
            checkpoint.load_master_into(ckpt, self.replica.master)
            meta = checkpoint.read_meta(ckpt)
            if self.replica.state_hash() != meta["state_hash"]:
                raise UserError(f"{ckpt}: weights do not match the state hash recorded beside them")
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
        """The replica's state hash, recomputed only when the master has moved (the run only
        changes the master through :meth:`close` and :meth:`replay_log`)."""
        cached = getattr(self, "_hash_cache", None)
        if cached is None or cached[0] != self.step:
            cached = (self.step, self.replica.state_hash())
            self._hash_cache = cached
        return cached[1]

    def replay_log(self) -> int:
        n = 0
        for rec in self.log.records(from_iteration=self.step):
            if rec["parent_hash"] != self.replica.state_hash():
                raise UserError(f"{self.out / LOG_NAME}: commit {rec['iteration']} does not follow the checkpoint")
            self.replica.apply(rec)
            if self.replica.state_hash() != rec["state_hash"]:
                raise UserError(f"replaying commit {rec['iteration']} gave a different state hash; this machine "
                                "cannot reproduce the run (noise self-test failed?)")
            n += 1
        return n

    # -- one iteration -------------------------------------------------------------------------------
    def plan(self, t: int) -> Plan:
        from .data import digest_indices, subset_indices

        es = self.cfg.es
        idx = subset_indices(len(self.train), es.samples_per_iteration, self.cfg.run.seed, t)
        return Plan(t, alpha_at(es, t), sigma_at(es, t),
                    population(self.cfg.run.seed, t, es.population, es.antithetic), idx, digest_indices(idx))

    def close(self, plan: Plan, rewards: list[float], stats: Optional[dict] = None) -> dict:
        """Shape, commit (log + fsync) and apply iteration ``plan.iteration``; returns the record."""
        if plan.iteration != self.step:
            raise RuntimeError(f"closing iteration {plan.iteration} but the state is at {self.step}")
        parent = self.state_hash
        record = close_iteration(self.cfg.es, plan.iteration, plan.members, rewards, plan.alpha, plan.sigma,
                                 self.replica.master.step)
        self.replica.apply(record)
        record["parent_hash"] = parent
        record["state_hash"] = self.state_hash
        record["subset_digest"] = plan.subset_digest
        record["stats"] = dict(stats or {})
        return self.log.append(record)

    def heldout_loss(self) -> float:
        s, c = self.replica.evaluate_center(self.ids_heldout, self.mask_heldout, self.cfg.es.micro_batch)
        return -s / c

    def checkpoint(self, final: bool = False) -> Path:
        last = self.log.last() if self.step > 0 else None
        meta = {"state_hash": self.state_hash, "config_hash": self.cfg.config_hash(),
                "log_chain": last["chain"] if last else "", "final": final}
        return checkpoint.save(checkpoint.step_dir(self.out, self.step), self.replica.model, self.replica.master,
                               self.tokenizer, meta, self.config_yaml)

    def banner(self, workers: str) -> str:
        from .model import count_parameters

        es, d = self.cfg.es, self.cfg.data
        tokens = es.population * es.samples_per_iteration * d.seq_len
        return (f"ea4llm-pool: {count_parameters(self.replica.model):,} parameters | population {es.population}"
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
        rewards = record["rewards"]
        fit = sum(rewards) / len(rewards)
        line = {"iteration": step, "train_fitness": fit, "train_loss": -fit, "alpha": record["alpha"],
                "sigma": record["sigma"], "state_hash": record["state_hash"], "seconds": seconds,
                "tokens_per_s": tokens / seconds if seconds > 0 else None, "heldout_loss": None,
                "wall_s": round(time.monotonic() - self._t_report, 3)}
        last = step >= self.cfg.run.iterations
        ev = self.cfg.run.eval_every
        if last or (ev and step % ev == 0):
            line["heldout_loss"] = self.heldout_loss()
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
