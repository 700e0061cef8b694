"""``ea4llm-pool experiment``: every method on one initialisation, one data split and one budget.

    OUT/experiment.json         the resolved experiment (budget, methods), fixed at the first start
    OUT/base/                   tokenizer + train/held-out samples every method shares; yardsticks.json
    OUT/methods/NAME/           one folder per method: spec.json, log.txt, curve.jsonl, result.json
                                (ES: run/ is a normal run directory: metrics, checkpoints, commit log)
    OUT/results.json, results.md, loss_vs_tokens.png, loss_vs_time.png

Each method runs in its own process (``python -m ea4llm_pool.experiment METHOD_DIR``), so its peak
memory is its own and methods can run side by side. ES methods drive the normal trainer (``Run`` +
``train_inprocess``, or ``ea4llm-pool train --workers K`` as a subprocess), so a pool can serve
them. A method folder holding result.json is finished; any other is resumed from its checkpoint.

The budget counts forward-token evaluations of training (an ES iteration: members × tokens of the
subset; AdamW: 3 × batch tokens; MeZO: 2 × batch tokens), or wall-clock minutes per method.
Held-out evaluations count towards neither tokens nor anything but wall time.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from . import UserError

SHARED_SECTIONS = ("model", "tokenizer", "data")
SHARED_RUN_KEYS = ("seed", "eval_samples")
YARDSTICKS = ("uniform", "unigram", "bigram")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
ITER_RE = re.compile(r"\{(?:([0-9]*\.?[0-9]+)\*)?iterations\}")


# ============================================================================== budget
class Budget(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    tokens: Optional[int] = None
    minutes: Optional[float] = None

    def text(self) -> str:
        return f"{self.tokens:,} forward tokens per method" if self.tokens else f"{self.minutes:g} min per method"


_TOKENS_RE = re.compile(r"^\s*(\d+(?:\.\d*)?(?:[eE]\d+)?)\s*([kKMG]?)\s*(?:tokens?)?\s*$")
_MINUTES_RE = re.compile(r"^\s*(\d+(?:\.\d*)?)\s*(?:min|mins|minutes?)\s*$")


def parse_budget(value: Union[str, int, float]) -> Budget:
    """'4M', '4000000', '3e6', '500k' (forward tokens) or '3min' (minutes per method)."""
    text = str(value)
    bad = (f"budget expects forward tokens (e.g. 4000000, 4M, 500k) or minutes per method "
           f"(e.g. 3min), got '{text}'")
    m = _MINUTES_RE.match(text)
    if m:
        minutes = float(m.group(1))
        if not minutes > 0:
            raise UserError(bad)
        return Budget(minutes=minutes)
    m = _TOKENS_RE.match(text)
    if not m:
        raise UserError(bad)
    tokens = int(float(m.group(1)) * {"": 1, "k": 1e3, "K": 1e3, "M": 1e6, "G": 1e9}[m.group(2)])
    if tokens < 1:
        raise UserError(bad)
    return Budget(tokens=tokens)


# ============================================================================== configuration
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class MethodCfg(_Strict):
    kind: Literal["es", "adamw", "mezo"]
    about: str = ""
    config: Optional[str] = None           # es: run config (relative to the experiment file); null = embedded default
    set: list[str] = Field(default_factory=list)  # es: key=value overrides; '{iterations}' / '{0.1*iterations}' allowed
    lr: Optional[float] = Field(None, gt=0)       # adamw, mezo
    batch: int = Field(16, ge=1)                  # adamw, mezo: samples per step
    beta1: float = Field(0.9, ge=0, lt=1)         # adamw
    beta2: float = Field(0.999, ge=0, lt=1)       # adamw
    weight_decay: float = Field(0.01, ge=0)       # adamw
    clip: float = Field(1.0, ge=0)                # adamw: gradient-norm clip (0 = none)
    eps: float = Field(1e-3, gt=0)                # mezo: perturbation scale

    @model_validator(mode="after")
    def _check(self) -> "MethodCfg":
        if self.kind == "es":
            if self.lr is not None:
                raise ValueError("lr is for adamw/mezo; an es method sets es.alpha in 'set'")
        else:
            if self.config is not None or self.set:
                raise ValueError(f"config and set are for es methods, not {self.kind}")
            if self.lr is None:
                raise ValueError(f"a {self.kind} method needs lr")
        return self


class BaseCfg(_Strict):
    config: Optional[str] = None
    set: list[str] = Field(default_factory=list)


class ExperimentCfg(_Strict):
    budget: Union[int, float, str] = "4M"
    base: BaseCfg = Field(default_factory=BaseCfg)
    eval_points: int = Field(20, ge=1)
    thresholds: list[Union[float, str]] = Field(default_factory=lambda: [6.5, 6.0, "unigram"])
    parallel: int = Field(1, ge=1)
    threads: int = Field(1, ge=0)
    workers: int = Field(0, ge=0)
    methods: dict[str, MethodCfg]

    @field_validator("methods")
    @classmethod
    def _names(cls, v: dict) -> dict:
        if not v:
            raise ValueError("at least one method is needed")
        for name in v:
            if not NAME_RE.match(name):
                raise ValueError(f"method name '{name}' must be letters, digits, '-', '_' or '.'")
        return v

    @field_validator("thresholds")
    @classmethod
    def _thresholds(cls, v: list) -> list:
        for t in v:
            if isinstance(t, str) and t not in YARDSTICKS:
                raise ValueError(f"threshold '{t}' is neither a loss nor one of {', '.join(YARDSTICKS)}")
        return v


def _one_line(err: ValidationError, origin: str) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        parts.append(f"unknown key '{loc}'" if e["type"] == "extra_forbidden" else (f"{loc}: {msg}" if loc else msg))
    return f"{origin}: " + "; ".join(parts)


def default_config_path() -> Path:
    return Path(__file__).resolve().parent.parent / "configs" / "experiment.yaml"


def load_experiment(path: Optional[str | Path]) -> tuple[ExperimentCfg, Path]:
    """The experiment file (default: configs/experiment.yaml) and the folder its paths are relative to."""
    p = Path(path) if path else default_config_path()
    if not p.is_file():
        raise UserError(f"experiment config not found: {p}")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as err:
        raise UserError(f"{p}: malformed YAML: {getattr(err, 'problem', err)}") from None
    if not isinstance(data, dict):
        raise UserError(f"{p}: expected a mapping at the top level")
    try:
        cfg = ExperimentCfg.model_validate(data)
    except ValidationError as err:
        raise UserError(_one_line(err, str(p))) from None
    parse_budget(cfg.budget)
    return cfg, p.resolve().parent


# ============================================================================== planning
def _load_run_config(path: Optional[str], root: Path, overrides: list[str], origin: str):
    from .config import load

    file = None
    if path is not None:
        file = Path(path) if Path(path).is_absolute() else root / path
        if not file.is_file():
            raise UserError(f"{origin}: config file not found: {file}")
    return load(file, overrides)


def base_config(exp: ExperimentCfg, root: Path):
    cfg = _load_run_config(exp.base.config, root, exp.base.set, "base")
    cfg.runtime.threads = exp.threads
    return cfg


def _substitute(items: list[str], iterations: Optional[int], name: str) -> list[str]:
    out = []
    for item in items:
        if ITER_RE.search(item) and iterations is None:
            raise UserError(f"method {name}: '{item}' depends on the iteration count, which a minutes budget does not fix")
        out.append(ITER_RE.sub(lambda m: str(max(1, round(float(m.group(1) or 1) * iterations))), item))
    return out


def es_plan(name: str, method: MethodCfg, exp: ExperimentCfg, root: Path, base, budget: Budget,
            tokens_per_sample: float, base_tokenizer: Optional[Path] = None):
    """The run config of an ES method: its own es section, the experiment's shared sections,
    iterations from the budget, held-out points every iterations/eval_points.

    ``base_tokenizer``: the tokenizer the experiment trained once; loading it instead of training
    the same one again saves each method the training (the samples are checked equal afterwards)."""
    for item in method.set:
        key = item.partition("=")[0].strip()
        if key.split(".")[0] in SHARED_SECTIONS or key in {f"run.{k}" for k in SHARED_RUN_KEYS}:
            raise UserError(f"method {name}: '{key}' is shared by every method; set it under base instead")
    # The population and subset size (so the iterations) may come from 'set' itself: read them with
    # any '{iterations}' replaced by a number large enough to pass validation.
    probe = _load_run_config(method.config, root, _substitute(method.set, 10 ** 6, name) if budget.tokens
                             else [i for i in method.set if not ITER_RE.search(i)], name)
    per_iteration = probe.es.population * probe.es.samples_per_iteration * tokens_per_sample
    iterations = max(1, int(budget.tokens // per_iteration)) if budget.tokens else None
    cfg = _load_run_config(method.config, root, _substitute(method.set, iterations, name), name)
    for section in SHARED_SECTIONS:
        setattr(cfg, section, getattr(base, section).model_copy(deep=True))
    for key in SHARED_RUN_KEYS:
        setattr(cfg.run, key, getattr(base.run, key))
    if base_tokenizer is not None and cfg.tokenizer.name_or_path is None:
        cfg.tokenizer.name_or_path = str(base_tokenizer)
    cfg.runtime = base.runtime.model_copy(deep=True)
    cfg.runtime.workers = exp.workers
    if iterations is not None:
        cfg.run.iterations = iterations
        cfg.run.eval_every = max(1, iterations // exp.eval_points)
        cfg.run.max_minutes = 0.0
    else:
        cfg.run.iterations = 10 ** 9  # the clock stops it
        cfg.run.eval_every = 0
        cfg.run.max_minutes = budget.minutes
    cfg.run.checkpoint_every = max(1, iterations // 4) if iterations else 50
    from .config import from_dict

    return from_dict(cfg.model_dump(mode="json"), f"method {name}"), iterations


# ============================================================================== one method (child process)
class _Stop:
    """SIGTERM/SIGINT: finish the current step, checkpoint, exit (the orchestrator resumes later)."""

    def __init__(self):
        self.flag = False
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: setattr(self, "flag", True))

    def __call__(self) -> bool:
        return self.flag


def _curve_upto(path: Path, step: int) -> list[dict]:
    from .baselines.loop import read_curve

    return [p for p in read_curve(path.parent) if p["step"] <= step] if path.is_file() else []


def _write_points(path: Path, points: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(p) + "\n" for p in points))
    os.replace(tmp, path)


def _extend_tokens(run, totals: list[int], upto: int) -> list[int]:
    """``totals[t]``: forward tokens spent by iterations 0 … t−1 (every member scores the subset)."""
    while len(totals) <= upto:
        plan = run.plan(len(totals) - 1)
        totals.append(totals[-1] + len(plan.members) * int(run.train.mask[plan.indices].sum()))
    return totals


def _run_es_inprocess(spec: dict, mdir: Path, stop: _Stop, say) -> dict:
    import torch

    from .checkpoint import list_checkpoints, load_master_into, load_model_skeleton
    from .config import load as load_config
    from .local import train_inprocess
    from .replay import replay as replay_commits
    from .replica import Replica
    from .run import Run

    torch.set_num_threads(max(1, spec["threads"]))
    rdir = mdir / "run"
    resume = bool(list_checkpoints(rdir))
    run = Run(None if resume else load_config(mdir / "config.yaml"), rdir, resume=resume, say=say)
    curve_path = mdir / "curve.jsonl"
    points = _curve_upto(curve_path, run.step)
    wall0 = points[-1]["wall_s"] if points else 0.0
    if spec["budget"].get("minutes"):
        run.cfg.run.max_minutes = max(1e-3, spec["budget"]["minutes"] - wall0 / 60)
    tokens = _extend_tokens(run, [0], run.step)
    t0 = time.perf_counter() - wall0  # set again once the evaluation replica is built
    eval_every_s = 60 * spec["budget"]["minutes"] / spec["eval_points"] if spec["budget"].get("minutes") else 0.0
    state = {"next_eval_s": wall0 + eval_every_s, "losses": []}

    def point(line: dict) -> None:
        _extend_tokens(run, tokens, line["iteration"])
        losses = state["losses"]
        points.append({"step": line["iteration"], "tokens": tokens[line["iteration"]],
                       "wall_s": round(time.perf_counter() - t0, 3), "heldout_loss": line["heldout_loss"],
                       "train_loss": sum(losses) / len(losses) if losses else None})
        state["losses"] = []
        state["next_eval_s"] = points[-1]["wall_s"] + eval_every_s
        _write_points(curve_path, points)

    def progress(line: dict) -> None:
        if line.get("train_loss") is not None:
            state["losses"].append(line["train_loss"])
        if line.get("heldout_loss") is None and eval_every_s and time.perf_counter() - t0 >= state["next_eval_s"]:
            line = dict(line, heldout_loss=run.heldout_loss())
            run.reporter.log({"iteration": line["iteration"], "heldout_loss": line["heldout_loss"], "event": "eval"})
        if line.get("heldout_loss") is not None:
            point(line)

    run.open_reporter()
    diverged = None
    try:
        ckpt = list_checkpoints(run.out)[-1][1]
        rep = Replica(load_model_skeleton(ckpt), run.cfg.es, "cpu", "fp32", run.cfg.runtime.chunk_elements)
        load_master_into(ckpt, rep.master)
        replay_commits(rep, run.log.records(rep.master.step), {rep.master.step: rep.state_hash()})
        say(run.banner("in-process (experiment)"))
        if not points:
            start = run.report_start()
            t0 = time.perf_counter()  # the clock starts after the start evaluation, as for the baselines
            progress(start)
        t0 = time.perf_counter() - points[-1]["wall_s"]
        try:
            train_inprocess(run, rep, progress, stop=stop)
        except UserError as err:  # Diverged: the run is checkpointed; report what it reached
            diverged = str(err)
        if not diverged and (not points or points[-1]["step"] != run.step):
            loss = run.heldout_loss()
            run.reporter.log({"iteration": run.step, "heldout_loss": loss, "event": "eval"})
            point({"iteration": run.step, "heldout_loss": loss})
    finally:
        run.reporter.close()
    stopped = "diverged" if diverged else ("interrupted" if stop() else "budget")
    return {"steps": run.step, "tokens": _extend_tokens(run, tokens, run.step)[run.step],
            "wall_s": time.perf_counter() - t0, "stopped": stopped, "note": diverged or ""}


def _curve_from_metrics(run_dir: Path) -> list[dict]:
    """Held-out points of a pool-run's metrics.jsonl; its wall clock restarts at each resume."""
    from .config import load as load_config
    from .data import SampleSet
    from .plan import plan_iteration

    cfg = load_config(run_dir / "config.yaml")
    train = SampleSet.load(run_dir / "data" / "train.npz")
    points, offset, last_wall, tokens, done = [], 0.0, 0.0, [0], 0
    for text in (run_dir / "metrics.jsonl").read_text().splitlines():
        try:
            line = json.loads(text)
        except ValueError:
            continue
        wall = line.get("wall_s") or 0.0
        if wall + offset < last_wall:
            offset = last_wall
        last_wall = wall + offset
        if line.get("heldout_loss") is None:
            continue
        it = line["iteration"]
        while done < it:
            plan = plan_iteration(cfg, len(train), done)
            tokens.append(tokens[-1] + len(plan.members) * int(train.mask[plan.indices].sum()))
            done += 1
        points.append({"step": it, "tokens": tokens[it], "wall_s": round(last_wall, 3),
                       "heldout_loss": line["heldout_loss"], "train_loss": line.get("train_loss")})
    return points


def _run_es_pool(spec: dict, mdir: Path, stop: _Stop, say) -> dict:
    from .checkpoint import list_checkpoints

    rdir = mdir / "run"
    cmd = [sys.executable, "-m", "ea4llm_pool", "train", "--out", str(rdir), "--workers", str(spec["workers"])]
    cmd += ["--resume"] if list_checkpoints(rdir) else ["--config", str(mdir / "config.yaml")]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd)
    while proc.poll() is None:
        if stop():
            proc.send_signal(signal.SIGTERM)
            proc.wait()
            break
        time.sleep(0.5)
    points = _curve_from_metrics(rdir)
    _write_points(mdir / "curve.jsonl", points)
    if proc.returncode not in (0, None) and not stop():
        raise UserError(f"ea4llm-pool train exited with status {proc.returncode}; see {mdir / 'log.txt'}")
    last = points[-1] if points else {"step": 0, "tokens": 0, "wall_s": time.perf_counter() - t0}
    return {"steps": last["step"], "tokens": last["tokens"], "wall_s": last["wall_s"],
            "stopped": "interrupted" if stop() else "budget", "note": "peak memory: the largest process of the pool"}


def _run_baseline(spec: dict, mdir: Path, stop: _Stop, say) -> dict:
    import torch
    from transformers import AutoTokenizer

    from .baselines import adamw, mezo
    from .baselines.loop import Budget as LoopBudget, run_baseline
    from .config import load as load_config
    from .data import SampleSet
    from .model import build_model

    torch.set_num_threads(max(1, spec["threads"]))
    base = Path(spec["base_dir"])
    cfg = load_config(base / "config.yaml")
    tok = AutoTokenizer.from_pretrained(str(base / "tokenizer"))
    train = SampleSet.load(base / "data" / "train.npz")
    heldout = SampleSet.load(base / "data" / "heldout.npz")
    ids_h, mask_h = heldout.batch(range(min(len(heldout), cfg.run.eval_samples)))
    model = build_model(cfg, vocab_size=len(tok), pad_token_id=tok.pad_token_id)
    m = spec["method"]
    if m["kind"] == "adamw":
        trainer, fwd = adamw.AdamWTrainer(model, m["lr"], m["beta1"], m["beta2"], m["weight_decay"], m["clip"]), \
            adamw.FORWARDS_PER_STEP
    else:
        trainer, fwd = mezo.MeZOTrainer(model, m["lr"], m["eps"], cfg.run.seed, cfg.es.micro_batch), \
            mezo.FORWARDS_PER_STEP
    b = spec["budget"]
    tokens_per_step = fwd * m["batch"] * float(train.mask.sum(axis=1).mean())
    if b.get("tokens"):
        steps = max(1, int(b["tokens"] // tokens_per_step))
        budget, eval_every, eval_s, ckpt = LoopBudget(tokens=b["tokens"]), max(1, steps // spec["eval_points"]), 0.0, \
            max(1, steps // 4)
    else:
        budget, eval_every, eval_s, ckpt = LoopBudget(seconds=60 * b["minutes"]), 0, \
            60 * b["minutes"] / spec["eval_points"], 200
    say(f"{m['kind']}: lr {m['lr']:g}, batch {m['batch']} × {train.seq_len} tokens, "
        f"{tokens_per_step:,.0f} forward tokens per step")
    result = run_baseline(trainer, fwd, train, ids_h, mask_h, batch=m["batch"], seed=cfg.run.seed, budget=budget,
                          eval_every=eval_every, checkpoint_every=ckpt, micro_batch=cfg.es.micro_batch, out=mdir,
                          eval_every_s=eval_s, stop=stop, say=say)
    result["note"] = ""
    return result


def run_method_dir(mdir: Path) -> int:
    """Child entry point: run (or resume) the method described by ``mdir/spec.json``."""
    from .baselines.common import peak_rss_bytes

    stop = _Stop()
    spec = json.loads((mdir / "spec.json").read_text())

    def say(msg: str) -> None:
        print(msg, flush=True)

    kind = spec["method"]["kind"]
    try:
        if kind != "es":
            result = _run_baseline(spec, mdir, stop, say)
        elif spec["workers"] > 0:
            result = _run_es_pool(spec, mdir, stop, say)
        else:
            result = _run_es_inprocess(spec, mdir, stop, say)
    except UserError as err:
        print(f"error: {err}", flush=True)
        return 2
    if result["stopped"] == "interrupted":
        say("interrupted: resume with --resume")
        return 3
    result["peak_rss_bytes"] = peak_rss_bytes()
    if spec["workers"] > 0 and kind == "es":
        import resource

        result["peak_rss_bytes"] = max(result["peak_rss_bytes"], resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)
    (mdir / "result.json").write_text(json.dumps(result, indent=1))
    say(f"done: {result['steps']} steps, {result['tokens']:,} tokens, {result['wall_s']:.1f} s")
    return 0


# ============================================================================== orchestration
def _prepare_base(exp: ExperimentCfg, root: Path, out: Path, say) -> dict:
    """Tokenizer, samples and yardsticks every method shares (computed once, reused on resume)."""
    from . import yardsticks

    base_dir = out / "base"
    info_path = base_dir / "base.json"
    if info_path.is_file():
        return json.loads(info_path.read_text())
    from .data import check_subset, load_texts, prepare_samples
    from .tokenizer import load_tokenizer

    cfg = base_config(exp, root)
    if base_dir.exists():
        shutil.rmtree(base_dir)
    base_dir.mkdir(parents=True)
    (base_dir / "config.yaml").write_text(cfg.to_yaml())
    # What Run's build_components does, without building the model: every method builds its own
    # from the same config and init_seed (the equal start losses in the results show it).
    t0 = time.perf_counter()
    texts = load_texts(cfg)
    tok = load_tokenizer(cfg, texts)
    train, heldout = prepare_samples(cfg, tok, texts)
    check_subset(cfg, len(train))
    tok.save_pretrained(base_dir / "tokenizer")
    (base_dir / "data").mkdir()
    train.save(base_dir / "data" / "train.npz")
    heldout.save(base_dir / "data" / "heldout.npz")
    say(f"data: {len(train)} train / {len(heldout)} held-out samples of {cfg.data.seq_len} tokens, "
        f"vocab {len(tok)} ({time.perf_counter() - t0:.1f} s to prepare)")
    ids, mask = heldout.batch(range(min(len(heldout), cfg.run.eval_samples)))
    ys = yardsticks.compute(train.input_ids, train.mask, ids.numpy(), mask.numpy(), _model_vocab(cfg, tok))
    info = {"train_digest": train.digest(), "heldout_digest": heldout.digest(), "train_samples": len(train),
            "heldout_samples": ys.heldout_samples, "seq_len": train.seq_len,
            "tokens_per_sample": float(train.mask.sum(axis=1).mean()), "yardsticks": ys.as_dict()}
    info_path.write_text(json.dumps(info, indent=1))
    return info


def _model_vocab(cfg, tok) -> int:
    """The vocabulary the model will have (its output size), read from its config, not its weights."""
    if cfg.model.name_or_path:
        from transformers import AutoConfig

        return int(AutoConfig.from_pretrained(cfg.model.name_or_path).vocab_size)
    from .model import preset_config

    return int(preset_config(cfg, len(tok), tok.pad_token_id).vocab_size)


def _write_specs(exp: ExperimentCfg, root: Path, out: Path, names: list[str], base_info: dict) -> None:
    budget = parse_budget(exp.budget)
    base = base_config(exp, root)
    for name in names:
        method = exp.methods[name]
        mdir = out / "methods" / name
        if (mdir / "spec.json").is_file():
            continue
        mdir.mkdir(parents=True, exist_ok=True)
        spec = {"name": name, "method": method.model_dump(mode="json"), "budget": budget.model_dump(),
                "eval_points": exp.eval_points, "threads": exp.threads, "workers": exp.workers,
                "base_dir": str((out / "base").resolve())}
        if method.kind == "es":
            cfg, iterations = es_plan(name, method, exp, root, base, budget, base_info["tokens_per_sample"],
                                      (out / "base" / "tokenizer").resolve())
            (mdir / "config.yaml").write_text(cfg.to_yaml())
            spec["iterations"] = iterations
        (mdir / "spec.json").write_text(json.dumps(spec, indent=1))


def _launch(out: Path, name: str) -> subprocess.Popen:
    mdir = out / "methods" / name
    log = open(mdir / "log.txt", "a")
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    return subprocess.Popen([sys.executable, "-m", "ea4llm_pool.experiment", str(mdir)], stdout=log,
                            stderr=subprocess.STDOUT, env=env)


def _run_all(out: Path, names: list[str], parallel: int, say) -> None:
    pending = [n for n in names if not (out / "methods" / n / "result.json").is_file()]
    running: dict[str, tuple[subprocess.Popen, float]] = {}
    try:
        while pending or running:
            while pending and len(running) < parallel:
                name = pending.pop(0)
                running[name] = (_launch(out, name), time.perf_counter())
                say(f"{name}: started")
            time.sleep(0.2)
            for name, (proc, t0) in list(running.items()):
                if proc.poll() is None:
                    continue
                del running[name]
                summary = _summarise(out, name)
                if proc.returncode == 0:
                    say(f"{name}: done in {time.perf_counter() - t0:.0f} s: held-out "
                        f"{summary['start_loss']:.3f} → {summary['final_loss']:.3f}")
                else:
                    tail = (out / "methods" / name / "log.txt").read_text().strip().splitlines()[-1:] or [""]
                    say(f"{name}: failed (exit {proc.returncode}): {tail[0]}")
    except KeyboardInterrupt:
        for proc, _ in running.values():
            proc.send_signal(signal.SIGTERM)
        for proc, _ in running.values():
            proc.wait()
        raise


# ============================================================================== results
def _threshold_value(t: Union[float, str], ys: dict) -> float:
    return float(ys[t]) if isinstance(t, str) else float(t)


def _threshold_label(t: Union[float, str], ys: dict) -> str:
    return f"{t} ({ys[t]:.2f})" if isinstance(t, str) else f"{t:g}"


def _summarise(out: Path, name: str, exp: Optional[ExperimentCfg] = None, ys: Optional[dict] = None) -> dict:
    from .baselines.loop import read_curve

    mdir = out / "methods" / name
    curve = read_curve(mdir)
    res = json.loads((mdir / "result.json").read_text()) if (mdir / "result.json").is_file() else None
    row: dict[str, Any] = {"name": name, "status": "not run", "curve": curve}
    if exp is not None:
        row.update(kind=exp.methods[name].kind, about=exp.methods[name].about)
    nan = float("nan")
    row.update(start_loss=curve[0]["heldout_loss"] if curve else nan, final_loss=curve[-1]["heldout_loss"] if curve else nan)
    finite = [p["heldout_loss"] for p in curve if math.isfinite(p["heldout_loss"])]
    row["best_loss"] = min(finite) if finite else nan
    row["drop"] = row["start_loss"] - row["final_loss"]
    if res is not None:
        row["status"] = "diverged" if res["stopped"] == "diverged" else "done"
        row.update(tokens=res["tokens"], wall_s=res["wall_s"], steps=res["steps"],
                   steps_per_s=res["steps"] / res["wall_s"] if res["wall_s"] > 0 else None,
                   peak_rss_mb=res["peak_rss_bytes"] / 2 ** 20, note=res.get("note", ""))
    elif curve:
        row["status"] = "unfinished"
    row["same_data"] = _same_data(out, mdir)
    if ys is not None:
        row["gap_unigram"] = row["final_loss"] - ys["unigram"]
        reach = {}
        for t in (exp.thresholds if exp else []):
            hit = next((p for p in curve if p["heldout_loss"] <= _threshold_value(t, ys)), None)
            reach[_threshold_label(t, ys)] = None if hit is None else {"tokens": hit["tokens"], "wall_s": hit["wall_s"]}
        row["reach"] = reach
    return row


def _same_data(out: Path, mdir: Path) -> Optional[bool]:
    """An ES method's samples are its own run's: check they are the base's, digest for digest."""
    from .data import SampleSet

    if not (mdir / "run" / "data" / "train.npz").is_file():
        return None
    base = json.loads((out / "base" / "base.json").read_text())
    return (SampleSet.load(mdir / "run" / "data" / "train.npz").digest() == base["train_digest"]
            and SampleSet.load(mdir / "run" / "data" / "heldout.npz").digest() == base["heldout_digest"])


def _fmt(x, spec: str = ".3f", none: str = "–") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return none
    return format(x, spec)


def _tokens_text(n: Optional[float]) -> str:
    if n is None:
        return "–"
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.0f}k"


def write_results(out: Path, exp: ExperimentCfg, base_info: dict, say=None) -> dict:
    ys = base_info["yardsticks"]
    rows = [_summarise(out, name, exp, ys) for name in exp.methods]
    same_start = sorted({round(r["start_loss"], 6) for r in rows if r["curve"]})
    budget = parse_budget(exp.budget)
    data = {"budget": budget.model_dump(), "yardsticks": ys, "base": {k: v for k, v in base_info.items() if k != "yardsticks"},
            "start_losses": same_start, "methods": rows}
    (out / "results.json").write_text(json.dumps(data, indent=1))
    labels = [_threshold_label(t, ys) for t in exp.thresholds]
    lines = [f"# Experiment: {len(rows)} methods, {budget.text()}", "",
             f"One initialisation and one data split ({base_info['train_samples']} training / "
             f"{base_info['heldout_samples']} held-out windows of {base_info['seq_len']} tokens). "
             f"Held-out loss in nats per token on the same windows for every method; start losses seen: "
             f"{', '.join(f'{s:.4f}' for s in same_start)}; ES runs whose samples equal the base's digest for "
             f"digest: {sum(1 for r in rows if r['same_data'])} of {sum(1 for r in rows if r['same_data'] is not None)}"
             f" (baselines read the base's samples).", "",
             "| yardstick (count model on the training windows) | held-out loss |", "|---|---|"]
    lines += [f"| {k} | {ys[k]:.3f} |" for k in YARDSTICKS]
    lines += ["", "| method | kind | status | start | final | drop | final − unigram | tokens | seconds | steps/s | "
              "peak RSS MB | " + " | ".join(f"reach {lab}: tokens / s" for lab in labels) + " |",
              "|" + "---|" * (11 + len(labels))]
    for r in rows:
        reach = [("–" if r["status"] == "not run" else "not reached" if r["reach"].get(lab) is None else
                  f"{_tokens_text(r['reach'][lab]['tokens'])} / {r['reach'][lab]['wall_s']:.0f}") for lab in labels]
        lines.append(f"| {r['name']} | {r.get('kind', '')} | {r['status']} | {_fmt(r['start_loss'])} | "
                     f"{_fmt(r['final_loss'])} | {_fmt(r['drop'])} | {_fmt(r.get('gap_unigram'), '+.3f')} | "
                     f"{_tokens_text(r.get('tokens'))} | {_fmt(r.get('wall_s'), '.0f')} | {_fmt(r.get('steps_per_s'), '.2f')} | "
                     f"{_fmt(r.get('peak_rss_mb'), '.0f')} | " + " | ".join(reach) + " |")
    lines += ["", "What each method is:", ""]
    lines += [f"- **{r['name']}**: {r.get('about') or r.get('kind')}" + (f" ({r['note']})" if r.get("note") else "")
              for r in rows]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    plot(out, rows, ys)
    return data


def plot(out: Path, rows: list[dict], ys: dict) -> None:
    """Two figures (x = forward tokens, x = wall time), each with every method and the yardsticks:
    all methods on the left, and on the right the zeroth-order ones (ES, MeZO) on their own scale,
    which backprop's curve would otherwise flatten."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cmap = plt.get_cmap("tab20")
    zeroth = [p["heldout_loss"] for r in rows if r.get("kind") != "adamw" for p in r["curve"]
              if math.isfinite(p["heldout_loss"])]
    for key, xlabel, fname, scale in (("tokens", "forward tokens (millions)", "loss_vs_tokens.png", 1e-6),
                                      ("wall_s", "wall time (s)", "loss_vs_time.png", 1.0)):
        fig, axes = plt.subplots(1, 2, figsize=(14, 5.5), dpi=110)
        for ax, zoom in zip(axes, (False, True)):
            for i, r in enumerate(rows):
                pts = [p for p in r["curve"] if math.isfinite(p["heldout_loss"])]
                if not pts:
                    continue
                style = "-" if r.get("kind") == "es" else "--"
                ax.plot([p[key] * scale for p in pts], [p["heldout_loss"] for p in pts], style, color=cmap(i % 20),
                        lw=1.4, marker="o", ms=2.5, label=r["name"])
            for name, ls in zip(YARDSTICKS, (":", "-.", (0, (8, 3)))):
                ax.axhline(ys[name], color="black", ls=ls, lw=1.1, label=f"{name} yardstick {ys[name]:.2f}")
            if zoom and zeroth:
                lo, hi = min(zeroth), max(zeroth)
                pad = 0.1 * (hi - lo) + 1e-3
                ax.set_ylim(lo - pad, hi + pad)
                ax.set_title("zoom: ES and MeZO", fontsize=9)
            else:
                ax.set_title("all methods", fontsize=9)
            ax.set_xlabel(xlabel)
            ax.set_ylabel("held-out loss (nats per token)")
            ax.grid(alpha=0.3)
        handles, labels = axes[0].get_legend_handles_labels()
        fig.legend(handles, labels, fontsize=7, loc="center right")
        fig.tight_layout(rect=(0, 0, 0.83, 1))
        fig.savefig(out / fname)
        plt.close(fig)


# ============================================================================== entry point
def _resolve_only(exp: ExperimentCfg, only: tuple[str, ...]) -> list[str]:
    names = [n.strip() for item in only for n in item.split(",") if n.strip()]
    if only and not names:
        raise UserError("--only needs a method name")
    unknown = [n for n in names if n not in exp.methods]
    if unknown:
        raise UserError(f"--only: unknown method '{unknown[0]}' (methods: {', '.join(exp.methods)})")
    return names or list(exp.methods)


def run_experiment(config: Optional[str], budget: Optional[str], out: Path, only: tuple[str, ...] = (),
                   resume: bool = False, parallel: Optional[int] = None, workers: Optional[int] = None,
                   say: Callable[[str], None] = print) -> dict:
    """Run (or resume, or re-run ``only``) an experiment in ``out``; returns results.json's content."""
    stored = out / "experiment.json"
    if stored.is_file():
        if not (resume or only):
            raise UserError(f"{out} already holds an experiment; pass --resume to continue it, "
                            f"--only NAME to re-run a method, or choose another --out")
        saved = json.loads(stored.read_text())
        exp, root = ExperimentCfg.model_validate(saved["experiment"]), Path(saved["root"])
        if config is not None:
            given, _ = load_experiment(config)
            if given.model_dump() != exp.model_dump():
                raise UserError(f"{out} holds an experiment made from another config; use another --out")
        if budget is not None and parse_budget(budget) != parse_budget(exp.budget):
            raise UserError(f"{out} holds an experiment with budget {parse_budget(exp.budget).text()}; "
                            f"use another --out for budget {budget}")
    else:
        if resume:
            raise UserError(f"--resume: {out} holds no experiment (no experiment.json)")
        exp, root = load_experiment(config)
        if budget is not None:
            exp.budget = str(budget)
        parse_budget(exp.budget)
        _resolve_only(exp, only)  # a bad name fails before anything is made
        if parse_budget(exp.budget).minutes:
            for name, method in exp.methods.items():
                _substitute(method.set, None, name)
        out.mkdir(parents=True, exist_ok=True)
        stored.write_text(json.dumps({"experiment": exp.model_dump(mode="json"), "root": str(root)}, indent=1))
    if parallel is not None:
        exp.parallel = parallel
    if workers is not None and workers != exp.workers:
        exp.workers = workers  # only methods not yet planned pick it up
    names = _resolve_only(exp, only)
    if only and not resume:
        for name in names:  # re-run alone: from scratch
            shutil.rmtree(out / "methods" / name, ignore_errors=True)
    base_info = _prepare_base(exp, root, out, say)
    ys = base_info["yardsticks"]
    say(f"experiment: {len(names)} of {len(exp.methods)} methods, {parse_budget(exp.budget).text()}, "
        f"{exp.parallel} at a time → {out}")
    say(f"yardsticks (held-out nats/token): uniform {ys['uniform']:.3f}, unigram {ys['unigram']:.3f}, "
        f"bigram {ys['bigram']:.3f}")
    _write_specs(exp, root, out, names, base_info)
    _run_all(out, names, exp.parallel, say)
    data = write_results(out, exp, base_info)
    say(f"results: {out / 'results.md'}, {out / 'results.json'}; plots: {out / 'loss_vs_tokens.png'}, "
        f"{out / 'loss_vs_time.png'}")
    return data


if __name__ == "__main__":
    from . import quiet_transformers

    quiet_transformers()
    sys.exit(run_method_dir(Path(sys.argv[1])))
