"""Checkpoints: directories that ``AutoModelForCausalLM.from_pretrained`` and
``AutoTokenizer.from_pretrained`` load as they are, with the ES state beside the weights.

    step-000250/
      config.json, model.safetensors   the fp32 master weights (save_pretrained)
      tokenizer.json, …                the run's tokenizer
      es_state.json                    step, iteration, state hash, config hash, log chain
      es_state.safetensors             optimizer moments (Adam), when used
      run_config.yaml                  the resolved run config

Written to a temporary sibling and renamed into place, so a crash never leaves half a checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from . import UserError
from .es.state import MasterState

ES_STATE = "es_state.json"
ES_TENSORS = "es_state.safetensors"
FORMAT = 1


def step_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step-{step:06d}"


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    root = Path(run_dir) / "checkpoints"
    out = []
    if root.is_dir():
        for d in root.iterdir():
            if d.name.startswith("step-") and (d / ES_STATE).is_file():
                try:
                    out.append((int(d.name[5:]), d))
                except ValueError:
                    pass
    return sorted(out)


def resolve(path: str | Path) -> Path:
    """A checkpoint directory, or a run directory (→ its latest checkpoint)."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"checkpoint not found: {p}")
    if (p / ES_STATE).is_file() or (p / "config.json").is_file():
        if not (p / "config.json").is_file():
            raise UserError(f"{p} is not a checkpoint directory (no config.json)")
        return p
    found = list_checkpoints(p)
    if found:
        return found[-1][1]
    raise UserError(f"{p} is not a checkpoint directory (no config.json) nor a run directory with checkpoints")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save(dest: Path, model, master: MasterState, tokenizer, meta: dict, run_config_yaml: str) -> Path:
    """Write a checkpoint of ``master`` (model supplies the architecture/config only)."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    state_dict = {p.name: p.flat.detach().cpu().view(p.shape).clone() for p in master.params}
    model.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    if master.optimizer == "adam":
        moments = {}
        for n, t in master.adam_m.items():
            moments["m." + n] = t.detach().cpu().contiguous()
        for n, t in master.adam_v.items():
            moments["v." + n] = t.detach().cpu().contiguous()
        save_file(moments, str(tmp / ES_TENSORS))
    info = dict(meta, format=FORMAT, step=master.step, iteration=master.iteration, optimizer=master.optimizer)
    (tmp / ES_STATE).write_text(json.dumps(info, indent=1, sort_keys=True) + "\n")
    (tmp / "run_config.yaml").write_text(run_config_yaml)
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(tmp, dest)
    _fsync_dir(dest.parent)
    return dest


def read_meta(ckpt: Path) -> dict:
    p = Path(ckpt) / ES_STATE
    try:
        return json.loads(p.read_text())
    except FileNotFoundError:
        raise UserError(f"{ckpt} is not an ea4llm-pool checkpoint (no {ES_STATE}); `hash`/`replay` need one") from None
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"{p} is unreadable: {err}") from None


def weight_tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    files = sorted(Path(ckpt).glob("*.safetensors"))
    files = [f for f in files if f.name != ES_TENSORS]
    if not files:
        raise UserError(f"{ckpt} holds no model weights (*.safetensors)")
    out: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            out.update(load_file(str(f)))
        except Exception as err:  # safetensors raises several types on corrupt files
            raise UserError(f"cannot read weights {f}: {str(err).splitlines()[0]}") from None
    return out


def load_model_skeleton(ckpt: Path):
    """The checkpoint's architecture in fp32, frozen in eval mode; the weights it loads are then
    overwritten bit-exactly from the master (``load_master_into``)."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32)
    except Exception as err:  # transformers raises many types for a bad directory
        raise UserError(f"cannot load model from {ckpt}: {str(err).splitlines()[0]}") from None
    return model.eval().requires_grad_(False)


def load_master_into(ckpt: Path, master: MasterState) -> None:
    """Overwrite ``master`` with the checkpoint's exact bits (weights and optimizer moments)."""
    weights = weight_tensors(ckpt)
    meta = read_meta(ckpt)
    tensors = {}
    for p in master.params:
        if p.name not in weights:
            raise UserError(f"{ckpt}: checkpoint lacks tensor {p.name}")
        t = weights[p.name]
        if t.dtype != torch.float32:
            raise UserError(f"{ckpt}: tensor {p.name} is {t.dtype}, an ES checkpoint stores fp32 masters")
        tensors[p.name] = t
    if master.optimizer == "adam":
        f = Path(ckpt) / ES_TENSORS
        if not f.is_file():
            raise UserError(f"{ckpt}: Adam moments ({ES_TENSORS}) missing")
        moments = load_file(str(f))
        for n in master.adam_m:
            tensors["adam.m." + n] = moments["m." + n]
            tensors["adam.v." + n] = moments["v." + n]
    master.load_tensors(tensors)
    master.step = int(meta["step"])
    master.iteration = int(meta["iteration"])
