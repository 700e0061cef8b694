"""Shipped configs: every one loads, the default file is the embedded default, bad input is one line."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from ea4llm_pool import UserError
from ea4llm_pool.config import GROUPS, Config, apply_overrides, load

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
SHIPPED = sorted(p for p in CONFIGS.glob("*.yaml") if p.name != "experiment.yaml")  # run configs
VARIANTS = sorted(CONFIGS.glob("variant-*.yaml"))


def test_the_configs_folder_ships_default_paper_and_seven_variants():
    names = {p.name for p in SHIPPED}
    assert {"default.yaml", "paper-1b.yaml"} <= names
    assert [p.name[:10] for p in VARIANTS] == [f"variant-{k}-" for k in range(1, 8)]


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load(path)
    assert isinstance(cfg, Config)
    assert cfg.config_hash()


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_key_of_a_shipped_config_has_a_comment(path):
    # top-level section names (run:, es:, ...) speak for themselves; every key below them says what it is
    for n, line in enumerate(path.read_text().splitlines(), 1):
        code = line.split("#", 1)[0]
        if re.match(r"^\s+[A-Za-z_]\w*:", code):
            assert "#" in line, f"{path.name}:{n} has no comment: {line.strip()}"


def test_default_yaml_is_exactly_the_embedded_default():
    assert load(CONFIGS / "default.yaml") == load()
    # and it spells out the whole schema, not just the keys that differ
    full = Config().model_dump(mode="json")
    written = yaml.safe_load((CONFIGS / "default.yaml").read_text())
    assert written.keys() == full.keys()
    for section in full:
        assert written[section].keys() == full[section].keys(), section


def test_paper_config_is_the_papers_global_setup():
    cfg = load(CONFIGS / "paper-1b.yaml")
    es, d = cfg.es, cfg.data
    assert cfg.model.preset == "paper-1b" and cfg.tokenizer.name_or_path is None
    assert (es.population, es.sigma, es.alpha) == (30, 1e-3, 5e-4)
    assert (cfg.run.iterations, es.samples_per_iteration, es.micro_batch) == (1000, 5000, 16)
    assert (d.seq_len, d.max_lines, d.packing) == (256, 10000, False)
    assert not es.antithetic and not es.nes_scaling and es.shaping == "zscore" and es.optimizer == "sgd"
    assert set(es.group_alpha.as_dict().values()) == {1.0} == set(es.group_sigma.as_dict().values())
    assert (es.schedule.alpha_gamma, es.schedule.alpha_step, es.schedule.sigma_gamma, es.schedule.sigma_step) \
        == (1.0, 0, 1.0, 0)
    assert (cfg.runtime.device, cfg.runtime.dtype) == ("cuda", "bf16")


def _toggles(cfg: Config) -> dict:
    es = cfg.es
    s = es.schedule
    return {"antithetic": es.antithetic, "nes_scaling": es.nes_scaling, "shaping": es.shaping,
            "group_alpha": es.group_alpha.as_dict(), "group_sigma": es.group_sigma.as_dict(),
            "schedule": (s.alpha_gamma, s.alpha_step, s.sigma_gamma, s.sigma_step)}


# What each paper §4.1 variant switches on top of the previous one.
STEPS = [
    {"antithetic"},
    {"nes_scaling"},
    {"shaping"},
    {"group_alpha"},
    {"group_sigma"},
    {"schedule"},
]


def test_each_variant_toggles_exactly_what_the_paper_adds_to_the_previous_one():
    cfgs = [load(p) for p in VARIANTS]
    for cfg in cfgs:  # all of them: the paper's update on the tiny model
        assert cfg.es.optimizer == "sgd" and cfg.model.preset == "tiny"
    base = _toggles(cfgs[0])
    assert base["antithetic"] is False and base["nes_scaling"] is False and base["shaping"] == "zscore"
    assert set(base["group_alpha"].values()) == {1.0} == set(base["group_sigma"].values())
    assert base["schedule"] == (1.0, 0, 1.0, 0)
    for prev, cur, changed in zip(cfgs, cfgs[1:], STEPS):
        a, b = _toggles(prev), _toggles(cur)
        assert {k for k in a if a[k] != b[k]} == changed
    last = cfgs[-1].es
    ga, gs = last.group_alpha, last.group_sigma
    assert ga.emb < 1 and ga.ln < 1 and ga.head < 1 and ga.attn == ga.mlp == 1.0
    assert gs.emb < 1 and gs.ln < 1 and gs.head < 1 and gs.attn == gs.mlp == 1.0
    sch = last.schedule
    assert sch.alpha_gamma < 1 and sch.alpha_step > 0 and sch.sigma_gamma < 1 and sch.sigma_step > 0


def test_unknown_key_names_the_key(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("es:\n  sigmaa: 0.1\n")
    with pytest.raises(UserError, match=r"unknown key 'es\.sigmaa'") as err:
        load(p)
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match=r"unknown key 'trainer'"):
        load(overrides=["trainer.lr=1"])


def test_malformed_yaml_is_one_line_with_the_line_number(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("run:\n  seed: 0\nes:\n  sigma: [0.1\n  alpha: 2\n")
    with pytest.raises(UserError) as err:
        load(p)
    msg = str(err.value)
    assert "\n" not in msg and "malformed YAML" in msg and str(p) in msg
    assert re.search(r"line \d+", msg)

    p.write_text("es:\n  sigma: 0.1\n   alpha: 2\n")  # bad indentation on line 3
    with pytest.raises(UserError, match=r"line 3\b"):
        load(p)


def test_missing_config_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load(tmp_path / "nope.yaml")


@pytest.mark.parametrize("item, where, value", [
    ("es.sigma=0.02", ("es", "sigma"), 0.02),
    ("es.sigma=1e-3", ("es", "sigma"), 1e-3),
    ("es.population=24", ("es", "population"), 24),
    ("es.antithetic=false", ("es", "antithetic"), False),
    ("es.shaping=zscore", ("es", "shaping"), "zscore"),
    ("data.max_lines=null", ("data", "max_lines"), None),
    ("data.source=/tmp/a novel.txt", ("data", "source"), "/tmp/a novel.txt"),
    ("es.group_alpha.emb=0.5", ("es", "group_alpha", "emb"), 0.5),
    ("runtime.device=cuda:1", ("runtime", "device"), "cuda:1"),
])
def test_set_overrides_parse_yaml_types(item, where, value):
    cfg = load(overrides=[item])
    node = cfg
    for k in where:
        node = getattr(node, k)
    assert node == value and type(node) is type(value)


def test_set_override_of_a_mistyped_value_names_the_key():
    with pytest.raises(UserError, match=r"es\.population"):
        load(overrides=["es.population=many"])
    with pytest.raises(UserError, match="key=value"):
        apply_overrides({}, ["es.sigma"])


def test_odd_population_with_antithetic_is_rejected():
    with pytest.raises(UserError, match="population must be even"):
        load(overrides=["es.antithetic=true", "es.population=15"])
    assert load(overrides=["es.antithetic=false", "es.population=15"]).es.population == 15


def test_group_names_match_the_schema():
    assert tuple(Config().es.group_alpha.as_dict()) == GROUPS
