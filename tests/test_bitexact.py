"""Specification of the replica-consistency contract (docs/design.md §2).

After every iteration, every replica's fp32 master is bit-identical whatever its evaluation dtype,
thread count or chunking; evaluating members never touches the master; a checkpoint plus the
commit log rebuilds the live weights exactly; the state hash covers the optimizer state.

The cross-process test runs this file as a child (``python tests/test_bitexact.py child SPEC``), so
each replica lives in its own interpreter with its own thread pool, as workers do.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

# The model both children build: a real Qwen3 from the tiny preset, shrunk so a forward is instant.
MODEL_OVERRIDES = ["model.preset=tiny", "model.hidden_size=32", "model.num_hidden_layers=2",
                   "model.intermediate_size=64", "model.num_attention_heads=2", "model.num_key_value_heads=1",
                   "model.init_seed=11"]
VOCAB = 128

SCENARIOS = {
    "sgd-zscore-nes-gaussian-layered": ["es.optimizer=sgd", "es.shaping=zscore", "es.nes_scaling=true",
                                        "es.noise=gaussian", "es.population=6", "es.alpha=2e-5", "es.sigma=0.02",
                                        "es.group_alpha.emb=0.5", "es.group_alpha.ln=0.25",
                                        "es.group_sigma.attn=2.0", "es.group_sigma.ln=0.0"],
    "adam-rank-rademacher": ["es.optimizer=adam", "es.shaping=rank", "es.noise=rademacher", "es.population=8",
                             "es.alpha=3e-3", "es.sigma=0.01", "es.group_alpha.mlp=0.5"],
}
COMMITS = 5


def _env() -> dict:
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


def bytes_digest(master) -> str:
    """sha256 of every master (and moment) tensor's raw bytes: independent of the state hash."""
    h = hashlib.sha256()
    for name, t in sorted(master.tensors().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _build_replica(overrides: list[str], dtype: str, chunk: int):
    from ea4llm_pool.config import load
    from ea4llm_pool.model import build_model
    from ea4llm_pool.replica import Replica

    cfg = load(overrides=MODEL_OVERRIDES + overrides)
    model = build_model(cfg, vocab_size=VOCAB, pad_token_id=0)
    return cfg, Replica(model, cfg.es, "cpu", dtype, chunk=chunk)


def _batch(seed: int, b: int = 3, t: int = 16):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (b, t), generator=g)
    return ids, torch.ones_like(ids)


def _child(spec_path: str) -> None:
    """One replica: apply the parent's commits, evaluating members in between; print hashes as JSON."""
    from ea4llm_pool.es.population import population

    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(spec["threads"])
    out = {"threads": torch.get_num_threads(), "dtype": spec["dtype"], "scenarios": {}}
    for name, sc in spec["scenarios"].items():
        cfg, rep = _build_replica(sc["overrides"], spec["dtype"], spec["chunk"])
        hashes, digests, fitness = [rep.state_hash()], [bytes_digest(rep.master)], []
        for rec in sc["commits"]:
            t = rec["iteration"]
            ids, mask = _batch(t)
            for m in population(cfg.run.seed, t, cfg.es.population, cfg.es.antithetic)[:3]:
                s, c = rep.evaluate_member(m.seed, m.sign, rec["sigma"], ids, mask, micro_batch=2)
                fitness.append(s / c)
            rep.apply(rec)
            hashes.append(rep.state_hash())
            digests.append(bytes_digest(rep.master))
        out["scenarios"][name] = {"hashes": hashes, "digests": digests, "fitness": fitness}
    print(json.dumps(out))


def _commits(overrides: list[str]) -> list[dict]:
    """COMMITS records built once, from fixed rewards (fitness differs between dtypes; commits must not)."""
    from ea4llm_pool.config import load
    from ea4llm_pool.es.commit import close_iteration
    from ea4llm_pool.es.population import population

    cfg = load(overrides=MODEL_OVERRIDES + overrides)
    es = cfg.es
    recs = []
    for t in range(COMMITS):
        members = population(cfg.run.seed, t, es.population, es.antithetic)
        rewards = [-4.0 + 0.1 * math.sin(7 * t + 3 * j) for j in range(len(members))]
        recs.append(close_iteration(es, t, members, rewards, es.alpha, es.sigma, step=t))
    return recs


# ====================================================================================== (a)

def test_fp32_one_thread_and_bf16_two_threads_replicas_in_separate_processes_agree_bit_for_bit(tmp_path):
    """Two interpreters — fp32 on 1 thread with 256k-element chunks, bf16 on 2 threads with 4k-element
    chunks — apply the same 5 commits (evaluating members in between) and hold the same master
    after every commit, for an SGD/z-score/NES/layered run and an Adam/rank/Rademacher run."""
    scenarios = {name: {"overrides": ov, "commits": _commits(ov)} for name, ov in SCENARIOS.items()}
    procs = []
    for label, threads, dtype, chunk in (("a", 1, "fp32", 1 << 18), ("b", 2, "bf16", 4096)):
        spec = tmp_path / f"{label}.json"
        spec.write_text(json.dumps({"threads": threads, "dtype": dtype, "chunk": chunk, "scenarios": scenarios}))
        procs.append(subprocess.Popen([sys.executable, __file__, "child", str(spec)], cwd=REPO, env=_env(),
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=300)
        assert p.returncode == 0, stderr[-3000:]
        results.append(json.loads(stdout.strip().splitlines()[-1]))
    a, b = results
    assert (a["threads"], a["dtype"], b["threads"], b["dtype"]) == (1, "fp32", 2, "bf16")

    # a third witness: this process applies the same commits directly to a master, no model forward
    from ea4llm_pool.es.noise import NoiseSource
    from ea4llm_pool.es.state import MasterState
    from ea4llm_pool.es.statehash import state_hash

    for name, sc in scenarios.items():
        ra, rb = a["scenarios"][name], b["scenarios"][name]
        assert len(ra["hashes"]) == COMMITS + 1
        assert ra["hashes"] == rb["hashes"], name
        assert ra["digests"] == rb["digests"], name
        assert len(set(ra["hashes"])) == COMMITS + 1  # every commit changed the state
        # the two processes really evaluated differently (bf16 vs fp32 forward) …
        assert ra["fitness"] != rb["fitness"]
        assert max(abs(x - y) for x, y in zip(ra["fitness"], rb["fitness"])) < 0.1
        # … and this process, with its own threads and chunking, agrees with both
        cfg, rep = _build_replica(sc["overrides"], "fp32", 1 << 18)
        master = MasterState.from_named(rep.model.named_parameters(), cfg.es.optimizer)
        mine = [state_hash(master)]
        for rec in sc["commits"]:
            apply_commit_json(master, rec, NoiseSource(cfg.es.noise, chunk=1000))
            mine.append(state_hash(master))
        assert mine == ra["hashes"], name


def apply_commit_json(master, rec, noise):
    """Apply a record after a JSON round trip, as a worker receives it."""
    from ea4llm_pool.es.update import apply_commit

    apply_commit(master, json.loads(json.dumps(rec)), noise)


# ====================================================================================== (b)

def test_evaluating_1000_members_leaves_the_master_bit_identical():
    from ea4llm_pool.es.population import population

    cfg, rep = _build_replica(["es.sigma=0.05", "es.group_sigma.emb=3.0"], "bf16", 1 << 12)
    before_hash = rep.state_hash()
    before = {n: t.clone() for n, t in rep.master.tensors().items()}
    ids, mask = _batch(0, b=2, t=8)
    center_before = rep.evaluate_center(ids, mask, 2)
    members = [m for t in range(125) for m in population(1, t, 8, antithetic=True)]
    assert len(members) == 1000
    for m in members:
        rep.evaluate_member(m.seed, m.sign, 0.05, ids, mask, micro_batch=2)
    assert rep.state_hash() == before_hash
    for n, t in rep.master.tensors().items():
        assert torch.equal(t, before[n]), n
    # and the centre evaluates exactly as before: the working copy is rebuilt, not "restored"
    assert rep.evaluate_center(ids, mask, 2) == center_before


def test_a_member_working_copy_is_cast_of_master_plus_scaled_noise():
    from ea4llm_pool.es.noise import NoiseSource
    from ea4llm_pool.es.perturb import fp32

    cfg, rep = _build_replica(["es.group_sigma.attn=2.0"], "bf16", 1 << 12)
    ids, mask = _batch(0, b=1, t=4)
    rep.evaluate_member(123, -1, 0.01, ids, mask, 1)
    src = NoiseSource()
    for p in rep.master.params:
        s = fp32(-1 * 0.01 * rep.group_sigma[p.group])
        expected = (src.eps(123, p.tid, 0, p.flat.numel()) * s + p.flat).to(torch.bfloat16)
        assert torch.equal(rep.working[p.name].reshape(-1), expected), p.name


# ====================================================================================== (c)

def _run_cli(*args: str) -> str:
    r = subprocess.run([sys.executable, "-m", "ea4llm_pool", *args], cwd=REPO, env=_env(), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r.stdout


def _printed_hash(stdout: str) -> str:
    m = re.search(r"state hash ([0-9a-f]{32})", stdout)
    assert m, stdout
    return m.group(1)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A 4-iteration in-process run (Adam, antithetic, rank), checkpoints at 0, 2 and 4; the local
    worker replica evaluates in bf16 while the coordinator's replica is fp32."""
    from ea4llm_pool.checkpoint import list_checkpoints, load_master_into
    from ea4llm_pool.config import load
    from ea4llm_pool.local import train_inprocess
    from ea4llm_pool.replica import Replica
    from ea4llm_pool.run import Run, load_model_skeleton

    out = tmp_path_factory.mktemp("run") / "r"
    cfg = load(overrides=MODEL_OVERRIDES + [
        "data.max_lines=400", "data.seq_len=16", "tokenizer.vocab_size=300",
        "es.population=4", "es.samples_per_iteration=4", "es.micro_batch=4",
        "run.iterations=4", "run.checkpoint_every=2", "run.eval_every=0", "run.eval_samples=4"])
    run = Run(cfg, out, say=lambda _msg: None)
    ckpt0 = list_checkpoints(out)[-1][1]
    worker = Replica(load_model_skeleton(ckpt0), run.cfg.es, "cpu", "bf16", cfg.runtime.chunk_elements)
    load_master_into(ckpt0, worker.master)
    hashes = [run.state_hash]
    run.open_reporter()
    try:
        train_inprocess(run, worker, progress=lambda line: hashes.append(line["state_hash"]))
    finally:
        run.reporter.close()
    assert run.step == 4 and worker.state_hash() == run.state_hash
    return {"out": out, "run": run, "hashes": hashes}


def test_the_run_checkpoints_at_the_expected_steps(trained_run):
    from ea4llm_pool.checkpoint import list_checkpoints

    assert [s for s, _ in list_checkpoints(trained_run["out"])] == [0, 2, 4]
    assert len(set(trained_run["hashes"])) == 5


def test_replaying_the_log_from_the_initial_checkpoint_rebuilds_the_live_weights(trained_run, tmp_path):
    copy = tmp_path / "only-step-0"
    shutil.copytree(trained_run["out"], copy)
    for step in ("step-000002", "step-000004"):
        shutil.rmtree(copy / "checkpoints" / step)
    stdout = _run_cli("replay", "--run", str(copy))
    assert "step-000000 + 4 commits" in stdout
    assert _printed_hash(stdout) == trained_run["run"].state_hash


def test_replaying_from_the_mid_run_checkpoint_rebuilds_every_later_state(trained_run):
    out = trained_run["out"]
    stdout = _run_cli("replay", "--run", str(out), "--to", "3")
    assert "step-000002 + 1 commits" in stdout
    assert _printed_hash(stdout) == trained_run["hashes"][3]


def test_the_final_checkpoint_hashes_to_the_live_state(trained_run):
    stdout = _run_cli("hash", "--checkpoint", str(trained_run["out"] / "checkpoints" / "step-000004"))
    assert stdout.split()[0] == trained_run["run"].state_hash


# ====================================================================================== (d)

def test_the_adam_moments_are_part_of_the_state_hash():
    from ea4llm_pool.es.state import MasterState
    from ea4llm_pool.es.statehash import state_hash

    cfg, rep = _build_replica(["es.optimizer=adam"], "fp32", 1 << 12)
    a = MasterState.from_named(rep.model.named_parameters(), "adam")
    b = MasterState.from_named(rep.model.named_parameters(), "adam")
    sgd = MasterState.from_named(rep.model.named_parameters(), "sgd")
    assert state_hash(a) == state_hash(b)
    assert state_hash(a) != state_hash(sgd)  # same weights, but one carries (zero) moments
    name = a.params[0].name
    assert "adam.m." + name in a.tensors() and "adam.v." + name in a.tensors()
    b.adam_v[name][17] = 1e-30  # one element of one second moment
    assert state_hash(a) != state_hash(b)
    b.adam_v[name][17] = 0.0
    assert state_hash(a) == state_hash(b)
    b.adam_m[a.params[-1].name][0] = -0.0  # the sign bit of a zero counts too
    assert state_hash(a) != state_hash(b)


def test_the_state_hash_sees_every_bit_position_and_the_step_counter():
    from ea4llm_pool.es.state import MasterState
    from ea4llm_pool.es.statehash import state_hash

    cfg, rep = _build_replica([], "fp32", 1 << 12)
    state = MasterState.from_named(rep.model.named_parameters(), "sgd")
    h0 = state_hash(state)
    flat = state.params[1].flat
    bits = flat.view(torch.int32)
    old = bits[5].item()
    bits[5] = old ^ 1  # lowest mantissa bit
    assert state_hash(state) != h0
    bits[5] = old
    a, b = flat[3].item(), flat[4].item()
    flat[3], flat[4] = b, a  # swapped elements
    assert a == b or state_hash(state) != h0
    flat[3], flat[4] = a, b
    assert state_hash(state) == h0
    state.step += 1
    assert state_hash(state) != h0


def test_the_state_hash_does_not_depend_on_threads_or_hash_chunking():
    from ea4llm_pool.es.state import MasterState
    from ea4llm_pool.es.statehash import tensor_sum

    cfg, rep = _build_replica([], "fp32", 1 << 12)
    state = MasterState.from_named(rep.model.named_parameters(), "sgd")
    flat = state.params[0].flat
    before = torch.get_num_threads()
    try:
        sums = []
        for threads, chunk in ((1, 1 << 20), (2, 1000), (2, 7)):
            torch.set_num_threads(threads)
            sums.append(tensor_sum(flat, chunk))
    finally:
        torch.set_num_threads(before)
    assert len(set(sums)) == 1


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "child":
        from ea4llm_pool import quiet_transformers

        quiet_transformers()
        _child(sys.argv[2])
    else:
        sys.exit("usage: python tests/test_bitexact.py child SPEC.json")
