"""Run configuration: one validated schema, loaded from YAML, overridable with ``--set key=value``.

The defaults in this file *are* the embedded default run (``configs/default.yaml`` mirrors them and
a test keeps the two equal). Units are given on every field.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from . import UserError

GROUPS = ("emb", "attn", "mlp", "ln", "head")
FITNESS_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
"""What an entry-point name may look like here: no ':' and no '/', so nothing reads as an import path."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RunCfg(_Section):
    seed: int = Field(0, ge=0, description="master seed: member seeds and data subsets derive from it")
    iterations: int = Field(300, ge=1, description="ES iterations (one update each)")
    checkpoint_every: int = Field(100, ge=1, description="iterations between checkpoints")
    eval_every: int = Field(10, ge=0, description="iterations between held-out evaluations (0 = only at the end)")
    eval_samples: int = Field(64, ge=1, description="held-out samples used for the held-out loss")
    max_minutes: float = Field(0.0, ge=0, description="stop after this many minutes of wall-clock (0 = no limit)")


class ModelCfg(_Section):
    preset: Optional[Literal["tiny", "small", "paper-1b"]] = Field(
        "tiny", description="built-in Qwen3 config; ignored when name_or_path is set")
    name_or_path: Optional[str] = Field(None, description="Hugging Face model name or local directory")
    from_scratch: bool = Field(False, description="with name_or_path: build from its config, random init")
    init_seed: int = Field(0, ge=0, description="seed of the random initialisation of a built model")
    # Optional overrides of the preset's Qwen3Config fields.
    hidden_size: Optional[int] = Field(None, ge=1)
    intermediate_size: Optional[int] = Field(None, ge=1)
    num_hidden_layers: Optional[int] = Field(None, ge=1)
    num_attention_heads: Optional[int] = Field(None, ge=1)
    num_key_value_heads: Optional[int] = Field(None, ge=1)
    head_dim: Optional[int] = Field(None, ge=1)
    max_position_embeddings: Optional[int] = Field(None, ge=1)
    tie_word_embeddings: Optional[bool] = None


class TokenizerCfg(_Section):
    name_or_path: Optional[str] = Field(None, description="HF tokenizer name/dir; null = train byte-level BPE on the corpus")
    vocab_size: int = Field(1024, ge=260, description="vocabulary of the trained BPE tokenizer (tokens)")


class DataCfg(_Section):
    source: str = Field("pydoc", description="'pydoc' (Python's own docs, offline), a text file/dir/glob, or a hub dataset name")
    text_column: str = Field("text", description="column holding the text in a datasets corpus")
    max_lines: Optional[int] = Field(None, ge=1, description="use at most this many lines of the corpus")
    seq_len: int = Field(64, ge=2, description="tokens per sample")
    packing: bool = Field(True, description="true: contiguous windows of seq_len tokens; false: one line per sample, padded")
    heldout_fraction: float = Field(0.1, gt=0, lt=1, description="tail of the corpus kept for held-out loss")


class GroupMultipliers(_Section):
    emb: float = Field(1.0, ge=0)
    attn: float = Field(1.0, ge=0)
    mlp: float = Field(1.0, ge=0)
    ln: float = Field(1.0, ge=0)
    head: float = Field(1.0, ge=0)

    def as_dict(self) -> dict[str, float]:
        return {g: getattr(self, g) for g in GROUPS}


class ScheduleCfg(_Section):
    alpha_gamma: float = Field(1.0, gt=0, description="alpha decay factor per alpha_step iterations")
    alpha_step: int = Field(0, ge=0, description="iterations per alpha decay (0 = constant)")
    sigma_gamma: float = Field(1.0, gt=0, description="sigma decay factor per sigma_step iterations")
    sigma_step: int = Field(0, ge=0, description="iterations per sigma decay (0 = constant)")


class ESCfg(_Section):
    population: int = Field(30, ge=2, description="members per iteration (N); even when antithetic")
    sigma: float = Field(0.01, gt=0, description="perturbation scale (parameter units)")
    alpha: float = Field(0.03, gt=0, description="step size (sgd: parameter units per unit of g_hat; adam: lr)")
    antithetic: bool = Field(False, description="mirror pairs +eps/-eps from one seed, signed rewards")
    shaping: Literal["zscore", "rank", "centered"] = Field(
        "zscore", description="fitness shaping of the (signed) rewards: zscore (Eq. 6), rank (Eq. 7) or centered "
                            "(minus the leave-one-out mean of the others, no division: a fitness baseline)")
    nes_scaling: bool = Field(False, description="divide the step by sigma (NES 1/sigma scaling)")
    noise: Literal["gaussian", "rademacher"] = Field("gaussian", description="perturbation distribution")
    optimizer: Literal["sgd", "adam"] = Field("sgd", description="sgd = the paper's update; adam = Adam on g_hat")
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    adam_beta2: float = Field(0.999, ge=0, lt=1)
    adam_eps: float = Field(1e-8, gt=0)
    samples_per_iteration: int = Field(32, ge=1, description="M: samples in the iteration's shared subset")
    micro_batch: int = Field(32, ge=1, description="samples per forward pass")
    group_alpha: GroupMultipliers = Field(default_factory=GroupMultipliers, description="alpha_g per group")
    group_sigma: GroupMultipliers = Field(default_factory=GroupMultipliers, description="sigma_g per group")
    schedule: ScheduleCfg = Field(default_factory=ScheduleCfg)
    # Beyond the paper (each off by default, so the defaults above keep the paper's estimator).
    pairing: Literal["signed", "paired"] = Field(
        "signed", description="antithetic shaping: signed = shape s_j*r_j together (paper Eq. 10); paired = "
                              "shape all raw rewards together, weight seed k by w(r+k) - w(r-k) (OpenAI ES)")
    alpha_warmup: int = Field(0, ge=0, description="iterations of linear alpha warm-up: alpha_t *= (t+1)/alpha_warmup")
    alpha_decay: Literal["none", "linear", "cosine"] = Field(
        "none", description="alpha decay after the warm-up, down to alpha_decay_floor*alpha at alpha_decay_end")
    alpha_decay_end: int = Field(0, ge=0, description="iteration where the decay reaches its floor (stays there)")
    alpha_decay_floor: float = Field(0.1, ge=0, le=1, description="alpha at the end of the decay, as a fraction of alpha")
    weight_decay: float = Field(
        0.0, ge=0, description="decoupled weight decay: theta -= (alpha_t*alpha_g*weight_decay)*theta each "
                               "iteration, before the step; norm gains (group ln) are not decayed; 0 = off")
    step_scale: Literal["mean", "rms"] = Field(
        "mean", description="g_hat = (1/N)*sum_j w_j*eps_j (mean, Eq. 8) or (1/sqrt(N))*sum_j (rms: with z-scores "
                            "the step's RMS per weight is alpha whatever N)")
    fitness: str = Field("logprob", description="per-sample reward: 'logprob' (the paper's) or the name of a plugin "
                         "registered in the 'ea4llm_pool.fitness' entry-point group (docs/fitness-plugins.md)")

    @field_validator("fitness")
    @classmethod
    def _fitness_name(cls, v: str) -> str:
        # A name, never a module path: which code runs is decided by what each machine installed.
        if not FITNESS_NAME.match(v):
            raise ValueError(f"fitness must be the name of an installed plugin (letters, digits, '.', '_', '-'), "
                             f"not a module path: got {v!r}")
        return v

    @model_validator(mode="after")
    def _check(self) -> "ESCfg":
        if self.antithetic and self.population % 2:
            raise ValueError(f"population must be even with antithetic sampling (got {self.population})")
        if self.pairing == "paired" and not self.antithetic:
            raise ValueError("pairing 'paired' weights antithetic pairs: it needs antithetic: true")
        if self.alpha_decay != "none" and self.alpha_decay_end <= self.alpha_warmup:
            raise ValueError(f"alpha_decay {self.alpha_decay} needs alpha_decay_end (iteration) > alpha_warmup "
                             f"(got {self.alpha_decay_end} <= {self.alpha_warmup})")
        top = self.alpha * max(self.group_alpha.as_dict().values()) * self.weight_decay
        if top >= 1:
            raise ValueError(f"weight_decay {self.weight_decay:g} with alpha {self.alpha:g} removes "
                             f"alpha*alpha_g*weight_decay = {top:g} >= 1 of every weight per iteration; "
                             "use alpha*weight_decay well below 1")
        return self


class RuntimeCfg(_Section):
    device: str = Field("cpu", description="cpu, cuda, cuda:N or mps (for local workers)")
    dtype: Literal["fp32", "bf16"] = Field("fp32", description="evaluation dtype of the working copy")
    threads: int = Field(1, ge=0, description="torch threads per local worker (0 = torch default)")
    workers: int = Field(2, ge=0, description="local worker processes started by `train` (0 = evaluate in-process)")
    chunk_elements: int = Field(0, ge=0, description="noise/update chunk (elements) for huge tensors; "
                                "0 = the device's default (CPU 2^18, CUDA 2^24), else >= 1024")
    compile: Literal["auto", "on", "off"] = Field(
        "auto", description="compiled integer noise/update kernels (same bits): auto = for models of "
                            ">= 20M parameters when the compiler works; a failed compile falls back to eager")

    @model_validator(mode="after")
    def _check(self) -> "RuntimeCfg":
        if 0 < self.chunk_elements < 1024:
            raise ValueError(f"chunk_elements must be 0 (device default) or >= 1024 (got {self.chunk_elements})")
        return self


class PoolCfg(_Section):
    bind: str = Field("tcp://127.0.0.1:0", description="coordinator control socket (port 0 = pick a free one)")
    heartbeat_s: float = Field(1.0, gt=0, description="worker ping interval (s)")
    worker_timeout_s: float = Field(10.0, gt=0, description="silence after which a worker is dropped (s)")
    lease_s: float = Field(10.0, gt=0, description="shortest lease expiry (s); a lease lasts 3x its expected "
                           "duration (measured throughput, model size, commits to catch up) + 5 s")
    quorum: float = Field(1.0, gt=0, le=1, description="fraction of antithetic pairs needed to close an iteration")
    verify: Literal["on", "off"] = Field(
        "on", description="check workers' fitness values by replication: a new worker's answers are used only once "
                          "another worker's agree; trusted ones are spot-checked (docs/trust.md)")
    keeper_verifies: bool = Field(True, description="the coordinator's own replica checks units too (it vouches "
                                  "for the pool from the start; turn off on a coordinator too slow for the model)")
    trust_after: int = Field(8, ge=1, description="agreements in a row that make a new worker trusted")
    spot_check: float = Field(0.1, ge=0, le=1, description="share of a trusted worker's units checked before use")
    untrusted_share: float = Field(0.5, gt=0, le=1, description="most of one iteration's units a single untrusted "
                                   "worker may answer first")
    verify_tolerance: float = Field(0.0, ge=0, description="largest difference of mean reward (nats) between two "
                                    "answers that still agree (0 = the measured bound per device and dtype)")

    @field_validator("verify", mode="before")
    @classmethod
    def _on_off(cls, v):
        # YAML 1.1 reads a bare on/off as a boolean.
        return {True: "on", False: "off"}.get(v, v) if isinstance(v, bool) else v


_LATE_ES = {"weight_decay": 0.0, "fitness": "logprob", "step_scale": "mean"}


class Config(_Section):
    run: RunCfg = Field(default_factory=RunCfg)
    model: ModelCfg = Field(default_factory=ModelCfg)
    tokenizer: TokenizerCfg = Field(default_factory=TokenizerCfg)
    data: DataCfg = Field(default_factory=DataCfg)
    es: ESCfg = Field(default_factory=ESCfg)
    runtime: RuntimeCfg = Field(default_factory=RuntimeCfg)
    pool: PoolCfg = Field(default_factory=PoolCfg)

    # Sections that determine the trajectory of the weights. runtime/pool and run bookkeeping do not.
    def trajectory_dict(self) -> dict[str, Any]:
        d = self.model_dump(mode="json")
        # Keys added after runs were recorded stay out while at their defaults, so an existing
        # run keeps its config hash (its run id, and what its workers are checked against).
        es = {k: v for k, v in d["es"].items() if k not in _LATE_ES or v != _LATE_ES[k]}
        return {"seed": d["run"]["seed"], "model": d["model"], "tokenizer": d["tokenizer"],
                "data": d["data"], "es": es}

    def config_hash(self) -> str:
        blob = json.dumps(self.trajectory_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _one_line(err: ValidationError, origin: str) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"] if not str(x).startswith("function-"))
        if e["type"] == "extra_forbidden":
            parts.append(f"unknown key '{loc}'")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            parts.append(f"{loc}: {msg}" if loc else msg)
    return f"{origin}: " + "; ".join(parts)


def _parse_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``key.sub=value`` strings (values parsed as YAML) to a nested dict."""
    for item in overrides:
        if "=" not in item:
            raise UserError(f"--set expects key=value, got '{item}'")
        key, _, raw = item.partition("=")
        path = [p for p in key.strip().split(".") if p]
        if not path:
            raise UserError(f"--set expects key=value, got '{item}'")
        node = data
        for p in path[:-1]:
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise UserError(f"--set {key}: '{p}' is not a section")
            node = nxt
        node[path[-1]] = _parse_value(raw)
    return data


def from_dict(data: Any, origin: str = "config") -> Config:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"{origin}: expected a mapping of sections at the top level, got {type(data).__name__}")
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise UserError(_one_line(err, origin)) from None


def load(path: Optional[str | Path] = None, overrides: Optional[list[str]] = None) -> Config:
    """Load a YAML config (or the embedded default when ``path`` is None) and apply overrides."""
    data: dict = {}
    origin = "default config"
    if path is not None:
        p = Path(path)
        origin = str(p)
        if not p.is_file():
            raise UserError(f"config file not found: {p}")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
            raise UserError(f"{p}: malformed YAML{where}: {getattr(err, 'problem', err)}") from None
        except (OSError, UnicodeDecodeError) as err:
            raise UserError(f"cannot read config {p}: {err}") from None
        if not isinstance(data, dict):
            raise UserError(f"{p}: expected a mapping of sections at the top level")
    if overrides:
        data = apply_overrides(data, list(overrides))
    return from_dict(data, origin)
