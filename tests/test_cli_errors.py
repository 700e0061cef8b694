"""Bad input of any kind ends with one line on stderr and a non-zero exit, never a traceback.

Each case runs the real CLI as a subprocess (``python -m ea4llm_pool ...``). Every process pays for
importing torch and transformers, so all cases are started at once and collected by one fixture;
the tests then read their results.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TRAIN = ["train", "--workers", "0", "--iterations", "1"]


def _cases(tmp: Path) -> dict[str, tuple[list[str], str]]:
    """name → (CLI arguments, text the one error line must contain)."""
    (tmp / "malformed.yaml").write_text("run:\n  seed: 0\nes:\n  sigma: 0.1\n   alpha: 2\n")  # line 5
    (tmp / "unknown.yaml").write_text("es:\n  sigmaa: 0.1\n")
    (tmp / "empty.txt").write_text("")
    (tmp / "not-a-checkpoint").mkdir()
    (tmp / "not-a-checkpoint" / "notes.txt").write_text("hello\n")
    (tmp / "not-a-run").mkdir()
    out = lambda name: ["--out", str(tmp / "runs" / name)]  # noqa: E731
    return {
        "missing config file": (TRAIN + ["--config", str(tmp / "nope.yaml")] + out("a"), "not found"),
        "malformed YAML": (TRAIN + ["--config", str(tmp / "malformed.yaml")] + out("b"), "line 5"),
        "unknown key": (TRAIN + ["--config", str(tmp / "unknown.yaml")] + out("c"), "es.sigmaa"),
        "empty corpus": (TRAIN + out("d") + ["--set", f"data.source={tmp / 'empty.txt'}"], "empty"),
        "missing corpus": (TRAIN + out("e") + ["--set", f"data.source={tmp / 'no-such-novel.txt'}"], "not found"),
        "seq_len beyond the model": (TRAIN + out("f") + ["--set", "data.seq_len=100000"], "maximum of 2048"),
        "eval of a directory that is not a checkpoint": (
            ["eval", "--checkpoint", str(tmp / "not-a-checkpoint")], "not a checkpoint"),
        "hash of a missing checkpoint": (["hash", "--checkpoint", str(tmp / "gone")], "not found"),
        "replay of a directory that is not a run": (["replay", "--run", str(tmp / "not-a-run")], "not a run"),
        "worker with a bad address": (["worker", "--connect", "not-a-url"], "tcp://"),
        "train on a GPU this machine lacks": (TRAIN + out("g") + ["--device", "cuda:0"], "CUDA is not available"),
    }


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, tuple[list[str], str, subprocess.CompletedProcess]]:
    tmp = tmp_path_factory.mktemp("cli-errors")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("EA4LLM_DEBUG", None)
    procs = {}
    for name, (args, expect) in _cases(tmp).items():
        procs[name] = (args, expect, subprocess.Popen([sys.executable, "-m", "ea4llm_pool", *args], cwd=tmp,
                                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                                      text=True))
    done = {}
    deadline = time.monotonic() + 240
    for name, (args, expect, p) in procs.items():
        try:
            stdout, stderr = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            stdout, stderr = p.communicate()
        done[name] = (args, expect, subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    done["_tmp"] = tmp
    return done


def _case_names() -> list[str]:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        return list(_cases(Path(d)))


@pytest.mark.parametrize("case", _case_names())
def test_bad_input_ends_in_one_error_line_and_a_nonzero_exit(results, case):
    args, expect, proc = results[case]
    where = f"ea4llm-pool {' '.join(args)}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
    assert proc.returncode not in (0, None, -9), where
    assert "Traceback" not in proc.stderr + proc.stdout, where
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), where
    assert expect in lines[0], where
    assert "internal error" not in lines[0], where


def test_a_bad_device_leaves_no_half_made_run_behind(results):
    out = results["_tmp"] / "runs" / "g"
    assert not (out / "commits.jsonl").exists() and not (out / "checkpoints").exists()
