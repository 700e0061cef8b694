"""Pluggable fitness (``es.fitness``): the built-in log-prob, or a function registered as an entry
point in the group ``ea4llm_pool.fitness`` by an installed package. The worked example is
``token-accuracy``, registered in the project's own pyproject.toml.

Plugins are discovered through real package metadata: the tests that need another package write a
``*.dist-info`` folder onto ``sys.path``, which is what ``pip install`` leaves behind.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ea4llm_pool import UserError
from ea4llm_pool.config import load as load_config
from ea4llm_pool.es import token_accuracy as ta_module
from ea4llm_pool.es.fitness import fitness_sums, sample_rewards
from ea4llm_pool.es.token_accuracy import token_accuracy
from ea4llm_pool.fitness_plugins import GROUP, available, load
from ea4llm_pool.model import build_model

VOCAB = 97
MODEL = ["model.preset=tiny", "model.hidden_size=32", "model.num_hidden_layers=2", "model.intermediate_size=64",
         "model.init_seed=3"]


@pytest.fixture(scope="module")
def model():
    return build_model(load_config(overrides=MODEL), vocab_size=VOCAB, pad_token_id=0)


def _padded(b: int, t: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (b, t), generator=g)
    mask = torch.zeros(b, t, dtype=torch.int64)
    for i, n in enumerate([t, t - 1, 2, t // 2, 5, 1][:b]):
        mask[i, :n] = 1
    return ids.masked_fill(mask == 0, 0), mask


class NextIsPlusOne(torch.nn.Module):
    """Logits whose argmax at every position is (token + 1) mod V; no decoder/head split, so the
    plugin takes its full-logits path."""

    def forward(self, input_ids, attention_mask=None):
        logits = torch.nn.functional.one_hot((input_ids + 1) % 10, 10).float()
        return type("Out", (), {"logits": logits})()


def _dist(root: Path, name: str, entry_points: dict[str, str]) -> None:
    """An installed distribution's metadata, as pip writes it (METADATA + entry_points.txt)."""
    info = root / f"{name}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    lines = [f"[{GROUP}]"] + [f"{k} = {v}" for k, v in entry_points.items()]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")


# ================================================================================== discovery and loading

def test_the_installed_package_registers_token_accuracy_beside_the_builtin():
    assert {"logprob", "token-accuracy"} <= set(available())
    assert available() == sorted(available())
    assert load("token-accuracy") is token_accuracy
    assert load("logprob") is sample_rewards


def test_an_unknown_name_is_one_line_naming_it_and_what_is_installed():
    with pytest.raises(UserError) as err:
        load("bleu-score")
    text = str(err.value)
    assert "'bleu-score' is not installed" in text and "logprob, token-accuracy" in text and "\n" not in text


def test_loading_never_imports_a_module_named_by_the_config(tmp_path, monkeypatch):
    """A module path, or the bare name of an importable module, runs nothing: only registered
    entry points are ever loaded."""
    (tmp_path / "sneaky_mod.py").write_text(f"open({str(tmp_path / 'ran')!r}, 'w').write('x')\ndef fn(*a): pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("sneaky_mod:fn", "sneaky_mod", "os:system", "os.path:join", "ea4llm_pool.es.token_accuracy:"
                 "token_accuracy", "../sneaky_mod", ""):
        with pytest.raises(UserError):
            load(name)
    assert not (tmp_path / "ran").exists() and "sneaky_mod" not in sys.modules
    with pytest.raises(UserError, match="never by a module path"):
        load("os:system")
    with pytest.raises(UserError, match="not a module path"):  # and no config can name one
        load_config(overrides=["es.fitness=os:system"])


def test_a_third_party_plugin_is_found_through_its_package_metadata(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "import torch\n"
        "def length(model, ids, mask):\n"
        "    return mask.sum(dim=1).to(torch.float32)\n"
        "not_a_function = 3\n")
    _dist(tmp_path, "my_rewards", {"length": "my_rewards:length", "broken": "missing_module_xyz:fn",
                                   "number": "my_rewards:not_a_function", "logprob": "my_rewards:length",
                                   "bad:name": "my_rewards:length"})
    _dist(tmp_path, "other_rewards", {"length": "other_rewards:length", "solo": "my_rewards:length"})
    monkeypatch.syspath_prepend(str(tmp_path))
    names = available()
    # claimed twice with different targets: refused, and not announced as available
    assert "length" not in names and {"solo", "broken", "number"} <= set(names) and "bad:name" not in names
    with pytest.raises(UserError, match="registered more than once"):
        load("length")
    with pytest.raises(UserError, match=r"'broken' \(missing_module_xyz:fn\) failed to load: ModuleNotFoundError"):
        load("broken")
    with pytest.raises(UserError, match="is not a function"):
        load("number")
    assert load("logprob") is sample_rewards  # a plugin cannot shadow the paper's fitness
    solo = load("solo")
    ids, mask = _padded(4, 9)
    assert fitness_sums(NextIsPlusOne(), ids, mask, 3, solo) == (float(mask.sum()), 4)


def test_a_fitness_that_does_not_return_one_reward_per_sample_is_refused():
    ids, mask = _padded(4, 9)
    with pytest.raises(ValueError, match=r"returned \(\), expected a tensor of shape \(2,\)"):
        fitness_sums(NextIsPlusOne(), ids, mask, 2, lambda m, i, k: torch.tensor(1.0))


# ================================================================================== token-accuracy

def test_token_accuracy_is_the_masked_fraction_of_next_tokens_the_argmax_gets_right():
    ids = torch.tensor([[1, 2, 3, 7, 8], [4, 5, 6, 0, 0], [9, 0, 1, 5, 5], [3, 0, 0, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    # targets vs predictions (x + 1) mod 10: row 0: 2✓ 3✓ 7✗ 8✓; row 1: only 4→5 scored ✓;
    # row 2: 9→0✓, 0→1✓, 1→5✗, 5→5✗; row 3: nothing scored → 0
    got = token_accuracy(NextIsPlusOne(), ids, mask)
    assert got.dtype == torch.float32 and got.tolist() == [0.75, 1.0, 0.5, 0.0]


def test_token_accuracy_over_head_slices_equals_the_argmax_of_the_full_logits(model, monkeypatch):
    ids, mask = _padded(6, 11, seed=4)
    with torch.no_grad():
        pred = model(input_ids=ids, attention_mask=mask).logits[:, :-1].argmax(-1)
    m = (mask[:, :-1] * mask[:, 1:]).float()
    want = ((pred == ids[:, 1:]).float() * m).sum(1) / m.sum(1).clamp_min(1)
    monkeypatch.setattr(ta_module, "LOGIT_SLICE_TOKENS", 7)  # slices that cut across samples
    assert torch.equal(token_accuracy(model, ids, mask), want)


def test_a_replica_scores_members_with_the_configured_fitness_and_keeps_log_prob_for_held_out(model):
    from ea4llm_pool.replica import Replica

    cfg = load_config(overrides=MODEL + ["es.fitness=token-accuracy"])
    rep = Replica(build_model(cfg, vocab_size=VOCAB, pad_token_id=0), cfg.es)
    plain = Replica(build_model(cfg, vocab_size=VOCAB, pad_token_id=0), load_config(overrides=MODEL).es)
    ids, mask = _padded(6, 11, seed=5)
    s, n = rep.evaluate_member(123, -1, 0.05, ids, mask, micro_batch=4)
    assert n == 6 and 0.0 <= s <= 6.0
    assert s == fitness_sums(rep.model, ids, mask, 4, token_accuracy)[0]  # the working copy is the member
    assert s != plain.evaluate_member(123, -1, 0.05, ids, mask, micro_batch=4)[0]
    assert rep.evaluate_center(ids, mask, 4) == plain.evaluate_center(ids, mask, 4)  # held-out: log-prob
    assert rep.evaluate_center(ids, mask, 4)[0] < 0


# ================================================================================== end to end

ROOT = Path(__file__).resolve().parent.parent
SMALL_RUN = ["--iterations", "3", "--threads", "1", "--set", "data.max_lines=400", "--set", "run.eval_samples=8",
             "--set", "es.population=4", "--set", "es.samples_per_iteration=4"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three `ea4llm-pool train` runs side by side: the default fitness in-process, token-accuracy on
    a pool with one worker process (the worker loads the plugin itself), and an unknown name."""
    tmp = tmp_path_factory.mktemp("fitness-runs")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1")
    env.pop("EA4LLM_DEBUG", None)
    cases = {"logprob": ["--workers", "0"],
             "token-accuracy": ["--workers", "1", "--set", "es.fitness=token-accuracy"],
             "unknown": ["--workers", "0", "--set", "es.fitness=bleu-score"]}
    procs = {name: subprocess.Popen([sys.executable, "-m", "ea4llm_pool", "train", "--out", str(tmp / name),
                                     *SMALL_RUN, *args], cwd=tmp, env=env, text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for name, args in cases.items()}
    done, deadline = {}, time.monotonic() + 400
    for name, p in procs.items():
        try:
            out, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
        done[name] = (tmp / name, p.returncode, out, err)
    return done


def _commits(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "commits.jsonl").read_text().splitlines() if line.strip()]


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def test_a_token_accuracy_run_trains_end_to_end_on_another_trajectory(runs):
    ta, rc, out, err = runs["token-accuracy"]
    assert rc == 0, out + err
    lp, rc_lp, out_lp, err_lp = runs["logprob"]
    assert rc_lp == 0, out_lp + err_lp
    assert load_config(ta / "config.yaml").es.fitness == "token-accuracy"
    ta_commits, lp_commits = _commits(ta), _commits(lp)
    assert len(ta_commits) == len(lp_commits) == 3
    assert all(0.0 <= r <= 1.0 for c in ta_commits for r in c["rewards"])  # accuracies, from the worker
    assert all(r < 0 for c in lp_commits for r in c["rewards"])             # log-probs
    assert [c["members"] for c in ta_commits] == [c["members"] for c in lp_commits]  # same seeds, data
    ta_hashes = [m["state_hash"] for m in _metrics(ta) if m.get("train_loss") is not None]
    lp_hashes = [m["state_hash"] for m in _metrics(lp) if m.get("train_loss") is not None]
    assert len(ta_hashes) == 3 and ta_hashes[-1] != lp_hashes[-1]
    held = [m["heldout_loss"] for m in _metrics(ta) if m.get("heldout_loss") is not None]
    assert len(held) >= 2 and all(5.0 < h < 9.0 for h in held)  # held-out stays the log-prob loss (nats)


def test_an_unknown_fitness_ends_train_with_one_line_naming_the_installed_ones(runs):
    _, rc, out, err = runs["unknown"]
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2 and "Traceback" not in out + err, out + err
    assert len(lines) == 1 and lines[0].startswith("error: fitness plugin 'bleu-score' is not installed"), err
    assert "installed: logprob, token-accuracy" in lines[0]
