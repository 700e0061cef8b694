"""What only a GPU can tell (DESIGN.md §7), in one script of a few minutes on one H200.

    python bench/gpu_check.py [--out gpu_check.json] [--vocab 151936] [--iterations 3]

Checks, one PASS/FAIL line each, and a JSON summary written to --out:
  1. selftest: the start-up self-test's digests computed on CUDA, eager and compiled kernels, equal
     the known answers (which are the CPU's), and a 1M-element update on CUDA equals the CPU's bits;
  2. pool: a short run with a CPU worker and a CUDA bf16 worker ends on the hash of the same run
     trained on the CPU alone (``train --workers 0``), with zero resyncs;
  3. speed: noise-and-update elements/s on CUDA, eager and compiled (bits compared); for the
     paper-1b model in bf16 (vocab --vocab; 151,936 is the paper's, 837M parameters): the
     commit apply time with 30 seeds, the state hash time, member-evaluation tokens/s and MFU
     (2·params·tokens/s over the dense bf16 peak, 989 TFLOP/s for an H200 SXM; --peak to change).
On a machine without CUDA it says so and exits 0. ``--device cpu`` (hidden) runs every code path on
the CPU with small sizes, as a dry run. Exit status 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from ports import free_port_pair  # noqa: E402

H200_BF16_DENSE = 989e12


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _timed(fn, dev: torch.device, repeats: int = 3) -> float:
    """Best of ``repeats`` after one warm-up."""
    fn()
    _sync(dev)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(dev)
        best = min(best, time.perf_counter() - t0)
    return best


# -- 1. self-test ---------------------------------------------------------------------------------

def check_selftest(dev: torch.device) -> dict:
    from ea4llm_pool.es import kernels
    from ea4llm_pool.es.noise import NoiseSource
    from ea4llm_pool.es.selftest import PARTS, known_answers, run_selftest

    want = known_answers()
    res = {"cpu_eager": run_selftest("cpu", False) == want}
    res["eager"] = {p: d == want[p] for p, d in run_selftest(dev, False).items()}
    ok, why = kernels.probe(dev)
    res["compile_probe"] = why
    res["compiled"] = {p: d == want[p] for p, d in run_selftest(dev, True).items()} if ok else {}
    # A bigger update than the self-test's: 1M elements, 8 seeds, CPU eager against both CUDA kernels.
    seeds, weights = [3 + 7 * j for j in range(8)], [j - 4 for j in range(8)]
    cpu = NoiseSource("gaussian", "cpu").accumulate(seeds, weights, 99, 4, 1_000_003)
    on_dev = NoiseSource("gaussian", dev).accumulate(seeds, weights, 99, 4, 1_000_003)
    res["large_eager"] = torch.equal(on_dev.cpu(), cpu)
    res["large_compiled"] = ok and torch.equal(
        NoiseSource("gaussian", dev, compiled=True).accumulate(seeds, weights, 99, 4, 1_000_003).cpu(), cpu)
    failing = [f"{p} (eager)" for p in PARTS if not res["eager"].get(p)]
    failing += [f"{p} (compiled)" for p in PARTS if not res["compiled"].get(p)]
    failing += [k for k in ("cpu_eager", "large_eager", "large_compiled") if not res[k]]
    res["passed"] = not failing
    res["line"] = "self-test digests on {} equal the CPU known answers (eager and compiled)".format(dev) \
        if not failing else "failing: " + ", ".join(failing) + ("" if ok else f" [compile: {why}]")
    return res


# -- 2. pool run ----------------------------------------------------------------------------------

POOL_CONFIG = {
    "run": {"seed": 5, "checkpoint_every": 1000, "eval_every": 0, "eval_samples": 8},
    "model": {"preset": "small"},            # 3.4M parameters: tensors above update.SMALL take the per-tensor path
    "data": {"seq_len": 32},
    "es": {"population": 8, "samples_per_iteration": 16, "micro_batch": 16},
    "runtime": {"threads": 1, "compile": "on"},
    "pool": {"heartbeat_s": 0.5, "worker_timeout_s": 30.0, "lease_s": 30.0},
}


def _cli(*args) -> list[str]:
    return [sys.executable, "-m", "ea4llm_pool", *map(str, args)]


def _last_hash(run: Path) -> str | None:
    rows = []
    p = run / "metrics.jsonl"
    for line in (p.read_text().splitlines() if p.exists() else []):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    rows = [r for r in rows if r.get("state_hash")]
    return rows[-1]["state_hash"] if rows else None


def check_pool(dev: torch.device, tmp: Path, iterations: int, timeout: float) -> dict:
    import yaml

    cfg = tmp / "pool.yaml"
    cfg.write_text(yaml.safe_dump(POOL_CONFIG))
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=path)
    res: dict = {"iterations": iterations, "model": "small preset (vocab from the offline BPE)"}
    t0 = time.perf_counter()
    ref = subprocess.run(_cli("train", "--config", cfg, "--out", tmp / "reference", "--workers", 0,
                              "--threads", 1, "--iterations", iterations, "--device", "cpu"),
                         capture_output=True, text=True, timeout=timeout, env=env)
    res["reference_s"] = round(time.perf_counter() - t0, 1)
    res["reference_hash"] = _last_hash(tmp / "reference")
    if ref.returncode != 0 or not res["reference_hash"]:
        res.update(passed=False, line=f"reference run failed: {(ref.stderr or ref.stdout).strip()[-300:]}")
        return res

    port = free_port_pair()
    out = tmp / "pool"
    logs = {n: open(tmp / f"{n}.log", "wb") for n in ("coordinator", "cpu", "gpu")}
    procs = {"coordinator": subprocess.Popen(
        _cli("coordinator", "--config", cfg, "--out", out, "--bind", f"tcp://127.0.0.1:{port}",
             "--iterations", iterations, "--threads", 2),
        stdout=logs["coordinator"], stderr=subprocess.STDOUT, env=env)}
    gpu_dtype = "bf16"
    for name, d in (("cpu", "cpu"), ("gpu", str(dev))):
        procs[name] = subprocess.Popen(
            _cli("worker", "--connect", f"tcp://127.0.0.1:{port}", "--device", d, "--dtype",
                 "fp32" if name == "cpu" else gpu_dtype, "--threads", 2, "--name", f"check-{name}",
                 "--cache", tmp / f"cache-{name}"), stdout=logs[name], stderr=subprocess.STDOUT, env=env)
    t0 = time.perf_counter()
    try:
        rc = procs["coordinator"].wait(timeout=timeout)
        for n in ("cpu", "gpu"):
            procs[n].wait(timeout=60)
    except subprocess.TimeoutExpired:
        rc = None
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
        for f in logs.values():
            f.close()
    res["pool_s"] = round(time.perf_counter() - t0, 1)
    res["exit_codes"] = {n: p.returncode for n, p in procs.items()}
    res["pool_hash"] = _last_hash(out)
    pool = json.loads((out / "pool.json").read_text()) if (out / "pool.json").exists() else {}
    res["resyncs"] = pool.get("counters", {}).get("resyncs")
    res["passed"] = rc == 0 and res["pool_hash"] == res["reference_hash"] and res["resyncs"] == 0
    if res["passed"]:
        res["line"] = (f"CPU fp32 + {dev} {gpu_dtype} workers end on the CPU-only hash {res['pool_hash'][:12]} "
                       f"after {iterations} iterations, 0 resyncs")
    else:
        tail = (tmp / "coordinator.log").read_text(errors="replace").strip().splitlines()[-3:]
        res["line"] = (f"coordinator rc {rc}, pool hash {res['pool_hash']}, reference {res['reference_hash']}, "
                       f"resyncs {res['resyncs']}; coordinator log: {' | '.join(tail)}")
        res["logs"] = {n: (tmp / f"{n}.log").read_text(errors="replace")[-2000:] for n in logs}
    return res


# -- 3. speed -------------------------------------------------------------------------------------

def check_update_speed(dev: torch.device, n: int, seeds: int) -> dict:
    import update_speed

    from ea4llm_pool.es.noise import default_chunk

    out = update_speed.run(n, seeds, dev, default_chunk(dev), [torch.get_num_threads()], 3)
    rows = {part: {"eager_elem_s": e, "compiled_elem_s": c, "ratio": c / e} for _, part, e, c in out["rows"]}
    u = rows["update"]
    return {"n": n, "seeds": seeds, "bits_equal": out["bits_equal"], "first_compiled_s": out["compile_s"],
            "parts": rows, "passed": out["bits_equal"],
            "line": f"update {u['eager_elem_s'] / 1e9:.2f} → {u['compiled_elem_s'] / 1e9:.2f} G elem/s "
                    f"(eager → compiled, {u['ratio']:.2f}×), bits equal: {out['bits_equal']}"}


def check_model_speed(dev: torch.device, preset: str, vocab: int, seq_len: int, samples: int, micro_batch: int,
                      seeds: int, peak: float) -> dict:
    from ea4llm_pool.config import from_dict
    from ea4llm_pool.es import kernels
    from ea4llm_pool.es.noise import NoiseSource
    from ea4llm_pool.es.perturb import write_member
    from ea4llm_pool.es.statehash import state_hash
    from ea4llm_pool.model import build_model, count_parameters
    from ea4llm_pool.replica import Replica

    cfg = from_dict({"model": {"preset": preset}, "es": {"optimizer": "sgd"}})
    t0 = time.perf_counter()
    model = build_model(cfg, vocab, None)
    params = count_parameters(model)
    dtype = "bf16" if dev.type == "cuda" else "fp32"
    rep = Replica(model, cfg.es, dev, dtype, chunk=0)
    build_s = time.perf_counter() - t0
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (samples, seq_len), generator=gen)
    mask = torch.ones_like(ids)
    res = {"preset": preset, "vocab": vocab, "params": params, "dtype": dtype, "seq_len": seq_len,
           "samples": samples, "micro_batch": micro_batch, "build_s": round(build_s, 1), "peak_flops": peak}
    rec = {"iteration": 0, "seeds": [1000 + j for j in range(seeds)],
           "weights": [(j % 7) - 3 or 1 for j in range(seeds)],
           "scales": {g: 2.0 ** -30 for g in ("emb", "attn", "mlp", "ln", "head")}, "adam": None}
    compiled_ok = kernels.probe(dev)[0]
    for mode in (["eager", "compiled"] if compiled_ok else ["eager"]):
        rep.noise = NoiseSource(cfg.es.noise, dev, chunk=0, compiled=mode == "compiled")
        member_s = _timed(lambda: rep.evaluate_member(7, 1, 0.001, ids, mask, micro_batch), dev, 2)
        write_s = _timed(lambda: write_member(rep.master, rep.working, rep.noise, 7, 1, 0.001, rep.group_sigma),
                         dev, 2)
        apply_s = _timed(lambda: rep.apply(rec), dev, 1)
        hash_s = _timed(lambda: state_hash(rep.master, compiled=mode == "compiled"), dev, 1)
        tokens_s = samples * seq_len / member_s
        res[mode] = {"member_s": member_s, "tokens_per_s": tokens_s, "mfu": 2 * params * tokens_s / peak,
                     "write_member_s": write_s, "apply_commit_s": apply_s,
                     "update_elem_seeds_per_s": params * seeds / apply_s, "state_hash_s": hash_s}
    best = res.get("compiled", res["eager"])
    res["passed"] = True
    res["line"] = (f"{preset} ({params / 1e6:.0f}M params, vocab {vocab}) {dtype}: member eval "
                   f"{best['tokens_per_s']:,.0f} tokens/s, MFU {100 * best['mfu']:.1f}% of {peak / 1e12:.0f} TFLOP/s; "
                   f"apply {seeds} seeds {res['eager']['apply_commit_s']:.2f} s eager"
                   + (f" / {res['compiled']['apply_commit_s']:.2f} s compiled" if "compiled" in res else "")
                   + f"; state hash {res['eager']['state_hash_s']:.2f} s eager"
                   + (f" / {res['compiled']['state_hash_s']:.2f} s compiled" if "compiled" in res else ""))
    return res


# -- main -----------------------------------------------------------------------------------------

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="gpu_check.json", help="JSON summary path")
    ap.add_argument("--vocab", type=int, default=151_936, help="vocabulary of the paper-1b model (151936 = paper)")
    ap.add_argument("--iterations", type=int, default=3, help="iterations of the pool run")
    ap.add_argument("--peak", type=float, default=H200_BF16_DENSE, help="dense bf16 peak FLOP/s for MFU")
    ap.add_argument("--device", default="cuda:0", help=argparse.SUPPRESS)
    ap.add_argument("--skip", default="", help="comma-separated checks to skip: selftest,pool,speed")
    args = ap.parse_args()
    dev = torch.device(args.device)
    dry = dev.type == "cpu"
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device on this machine; nothing to check")
        return 0
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu (dry run, small sizes)"
    print(f"gpu_check on {dev} ({name}); torch {torch.__version__}; peak used for MFU {args.peak / 1e12:.0f} TFLOP/s")
    skip = {s for s in args.skip.split(",") if s}
    summary: dict = {"device": str(dev), "device_name": name, "torch": torch.__version__, "dry_run": dry, "checks": {}}
    t_all = time.perf_counter()

    def run(label: str, fn) -> None:
        t0 = time.perf_counter()
        try:
            res = fn()
        except Exception as err:  # one failing check must not hide the others' results
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            res = {"passed": False, "line": f"{type(err).__name__}: {first}"}
        res["seconds"] = round(time.perf_counter() - t0, 1)
        summary["checks"][label] = res
        print(f"{'PASS' if res['passed'] else 'FAIL'} {label}: {res['line']} ({res['seconds']} s)", flush=True)

    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
        if "selftest" not in skip:
            run("selftest", lambda: check_selftest(dev))
        if "pool" not in skip:
            run("pool", lambda: check_pool(dev, Path(tmp), args.iterations, 240.0))
        if "speed" not in skip:
            run("update speed", lambda: check_update_speed(dev, (1 << 20) if dry else (1 << 26), 8))
            if dry:
                run("model speed", lambda: check_model_speed(dev, "tiny", 1024, 64, 8, 8, 30, args.peak))
            else:
                run("model speed", lambda: check_model_speed(dev, "paper-1b", args.vocab, 256, 64, 16, 30, args.peak))
    summary["seconds"] = round(time.perf_counter() - t_all, 1)
    summary["passed"] = all(c["passed"] for c in summary["checks"].values())
    Path(args.out).write_text(json.dumps(summary, indent=1, default=float) + "\n")
    print(f"{'PASS' if summary['passed'] else 'FAIL'} all ({summary['seconds']} s); summary in {args.out}")
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
