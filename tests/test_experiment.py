"""``ea4llm-pool experiment`` in a reduced mode: a tiny corpus and budget, three methods (two ES, one
baseline) run side by side; every method must leave a finite curve, the results name every method,
and bad input is one line."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from ea4llm_pool import UserError
from ea4llm_pool.cli import cli
from ea4llm_pool.experiment import load_experiment, parse_budget

CONFIGS = Path(__file__).resolve().parent.parent / "configs"

REDUCED = {
    "budget": "12k",
    "eval_points": 2,
    "thresholds": [6.9, "unigram"],
    "parallel": 3,  # all at once: most of a method's time is importing torch and building the model
    "base": {"set": ["data.max_lines=400", "run.eval_samples=8"]},
    "methods": {
        "default": {"kind": "es", "about": "embedded default, smaller population", "set": ["es.population=4", "es.samples_per_iteration=4", "es.micro_batch=4"]},
        "paired": {"kind": "es", "set": ["es.population=4", "es.samples_per_iteration=4", "es.antithetic=true", "es.pairing=paired", "es.alpha_warmup=1",
                                         "es.alpha_decay=cosine", "es.alpha_decay_end={iterations}"]},
        "adamw": {"kind": "adamw", "lr": 0.003, "batch": 4},
        "mezo": {"kind": "mezo", "lr": 0.001, "batch": 4},
    },
}


@pytest.fixture(scope="module")
def reduced(tmp_path_factory):
    root = tmp_path_factory.mktemp("exp")
    (root / "exp.yaml").write_text(yaml.safe_dump(REDUCED, sort_keys=False))
    out = root / "out"
    res = CliRunner().invoke(cli, ["experiment", "--config", str(root / "exp.yaml"), "--out", str(out),
                                   "--only", "default,paired", "--only", "adamw"])
    assert res.exit_code == 0, res.output
    return root, out, res.output


def test_every_method_run_leaves_a_finite_curve_within_the_budget(reduced):
    _, out, _ = reduced
    data = json.loads((out / "results.json").read_text())
    rows = {r["name"]: r for r in data["methods"]}
    assert list(rows) == ["default", "paired", "adamw", "mezo"]  # every configured method is reported
    for name in ("default", "paired", "adamw"):
        r = rows[name]
        assert r["status"] == "done", name
        losses = [p["heldout_loss"] for p in r["curve"]]
        assert len(losses) >= 2 and all(math.isfinite(x) for x in losses), name
        assert 0 < r["tokens"] <= 12_000 and r["peak_rss_mb"] > 0 and r["steps_per_s"] > 0
        assert r["gap_unigram"] == pytest.approx(r["final_loss"] - data["yardsticks"]["unigram"])
    assert rows["mezo"]["status"] == "not run" and rows["mezo"]["curve"] == []
    # one initialisation and one data split
    assert len(data["start_losses"]) == 1
    assert rows["default"]["same_data"] and rows["paired"]["same_data"]
    # ES tokens per iteration: 4 members × 4 samples × 64 tokens; 12k buys 11 iterations
    assert rows["default"]["steps"] == 11 and rows["default"]["tokens"] == 11 * 4 * 4 * 64
    spec = json.loads((out / "methods" / "paired" / "spec.json").read_text())
    cfg = yaml.safe_load((out / "methods" / "paired" / "config.yaml").read_text())
    assert spec["iterations"] == 11 and cfg["es"]["alpha_decay_end"] == 11 and cfg["es"]["pairing"] == "paired"


def test_results_md_and_the_plots_show_every_method_and_the_yardsticks(reduced):
    _, out, output = reduced
    md = (out / "results.md").read_text()
    for name in ("default", "paired", "adamw", "mezo", "uniform", "unigram", "bigram"):
        assert f"| {name} |" in md
    assert "reach 6.9: tokens / s" in md and "reach unigram" in md
    for png in ("loss_vs_tokens.png", "loss_vs_time.png"):
        assert (out / png).stat().st_size > 10_000
    assert "yardsticks (held-out nats/token)" in output


def test_a_method_is_rerun_alone_and_the_others_are_kept(reduced):
    root, out, _ = reduced
    before = json.loads((out / "results.json").read_text())
    res = CliRunner().invoke(cli, ["experiment", "--out", str(out), "--only", "mezo"])
    assert res.exit_code == 0, res.output
    after = {r["name"]: r for r in json.loads((out / "results.json").read_text())["methods"]}
    assert after["mezo"]["status"] == "done" and all(math.isfinite(p["heldout_loss"]) for p in after["mezo"]["curve"])
    assert after["default"]["curve"] == before["methods"][0]["curve"]  # not run again
    # --resume with everything finished runs nothing and rewrites the same table
    res = CliRunner().invoke(cli, ["experiment", "--out", str(out), "--resume"])
    assert res.exit_code == 0 and "started" not in res.output


@pytest.mark.parametrize("args, message", [
    (["--budget", "lots"], "budget expects forward tokens"),
    (["--budget", "5m"], "budget expects forward tokens"),
    (["--budget", "0"], "budget expects forward tokens"),
    (["--only", "nosuch"], "--only: unknown method 'nosuch'"),
    (["--resume"], "--resume needs --out"),
    (["--config", "/no/such.yaml"], "experiment config not found"),
])
def test_bad_input_is_one_line(tmp_path, args, message):
    res = subprocess.run([sys.executable, "-m", "ea4llm_pool", "experiment", "--out", str(tmp_path / "x"), *args]
                         if args != ["--resume"] else [sys.executable, "-m", "ea4llm_pool", "experiment", *args],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], res.stderr
    assert not (tmp_path / "x" / "methods").exists()


def test_resume_of_nothing_and_a_changed_budget_are_refused(reduced, tmp_path):
    _, out, _ = reduced
    res = CliRunner().invoke(cli, ["experiment", "--out", str(tmp_path / "empty"), "--resume"])
    assert res.exit_code == 2 and "holds no experiment" in res.output
    res = CliRunner().invoke(cli, ["experiment", "--out", str(out), "--resume", "--budget", "1M"])
    assert res.exit_code == 2 and "budget" in res.output
    res = CliRunner().invoke(cli, ["experiment", "--out", str(out)])
    assert res.exit_code == 2 and "already holds an experiment" in res.output


def test_budgets_parse_as_tokens_or_minutes():
    assert parse_budget("4M").tokens == 4_000_000 and parse_budget("500k").tokens == 500_000
    assert parse_budget(3_000_000).tokens == 3_000_000 and parse_budget("2.5e6").tokens == 2_500_000
    assert parse_budget("3min").minutes == 3.0 and parse_budget("1.5 minutes").minutes == 1.5


def test_the_shipped_experiment_runs_every_variant_the_default_both_baselines_and_each_extra():
    exp, root = load_experiment(CONFIGS / "experiment.yaml")
    names = list(exp.methods)
    assert [n for n in names if n.startswith("variant-")] == [p.stem for p in sorted(CONFIGS.glob("variant-*.yaml"))]
    assert {"default", "adamw", "mezo", "paired-rank", "paired-zscore", "warmup-cosine", "pop32x8"} <= set(names)
    for line in (CONFIGS / "experiment.yaml").read_text().splitlines():
        m = re.match(r"^\s*[A-Za-z_][\w.-]*:\s*(.*)$", line.split("#", 1)[0])
        if m and m.group(1).strip():  # a key with a value (section headers speak for themselves)
            assert "#" in line, line

def test_a_method_may_not_change_what_every_method_shares(tmp_path):
    from ea4llm_pool.experiment import ExperimentCfg, base_config, es_plan

    exp = ExperimentCfg.model_validate({"methods": {"x": {"kind": "es", "set": ["data.seq_len=32"]}}})
    with pytest.raises(UserError, match="shared by every method"):
        es_plan("x", exp.methods["x"], exp, tmp_path, base_config(exp, tmp_path), parse_budget("1M"), 64.0)
