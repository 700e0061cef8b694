"""Command line: ``ea4llm-pool train | coordinator | worker | status | eval | replay | hash``.

    ea4llm-pool train                                   # embedded default, one machine
    ea4llm-pool train --config configs/paper-1b.yaml --out runs/1b --device cuda:0
    ea4llm-pool coordinator --config configs/default.yaml --out runs/lab --bind tcp://*:5555
    ea4llm-pool worker --connect tcp://coordinator-host:5555 --device cuda:0 --dtype bf16
    ea4llm-pool status --connect tcp://coordinator-host:5555
    ea4llm-pool eval --checkpoint runs/default
    ea4llm-pool replay --run runs/default --to 100
    ea4llm-pool hash --checkpoint runs/default/checkpoints/step-000100

Bad input of any kind ends with one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import click

from . import UserError, __version__

EXIT_USER = 2


def _fail(message: str, code: int = EXIT_USER):
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def guarded(fn):
    """Turn UserError (and other expected failures) into one line and a non-zero exit."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as err:
            _fail(str(err).splitlines()[0] if str(err) else type(err).__name__)
        except KeyboardInterrupt:
            _fail("interrupted", 130)
        except (OSError, MemoryError) as err:
            if os.environ.get("EA4LLM_DEBUG"):
                raise
            _fail(f"{type(err).__name__}: {err}")
        except Exception as err:  # a bug: say so in one line, full traceback on request
            if os.environ.get("EA4LLM_DEBUG"):
                raise
            first = str(err).splitlines()[0] if str(err) else ""
            _fail(f"internal error ({type(err).__name__}: {first}); rerun with EA4LLM_DEBUG=1 for the traceback", 1)

    return wrapper


def _say(msg: str) -> None:
    click.echo(msg, err=False)
    sys.stdout.flush()


def _load_cfg(config: Optional[str], overrides: tuple[str, ...]):
    from .config import load

    return load(config, list(overrides))


def _default_out(config: Optional[str]) -> Path:
    stem = Path(config).stem if config else "default"
    base = Path("runs") / stem
    out, k = base, 2
    while out.exists() and any(out.iterdir()):
        out = base.with_name(f"{stem}-{k}")
        k += 1
    return out


class Progress:
    """A tqdm bar on a terminal; plain log lines otherwise."""

    def __init__(self, total: int, start: int):
        self.tty = sys.stdout.isatty()
        self.bar = None
        self.last_print = 0.0
        if self.tty:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, unit="it", dynamic_ncols=True)

    def __call__(self, line: dict) -> None:
        loss = line.get("train_loss")
        held = line.get("heldout_loss")
        if self.bar is not None:
            post = {"loss": f"{loss:.4f}"} if loss is not None else {}
            if held is not None:
                post["held-out"] = f"{held:.4f}"
            self.bar.set_postfix(post, refresh=False)
            self.bar.update(1)
            if held is not None:
                self.bar.write(f"iteration {line['iteration']}: held-out loss {held:.4f}")
            return
        now = time.monotonic()
        if held is not None or now - self.last_print > 10:
            self.last_print = now
            parts = [f"iteration {line['iteration']}"]
            if loss is not None:
                parts.append(f"train loss {loss:.4f}")
            if held is not None:
                parts.append(f"held-out loss {held:.4f}")
            if line.get("tokens_per_s"):
                parts.append(f"{line['tokens_per_s']:,.0f} tokens/s")
            parts.append(f"hash {line['state_hash'][:12]}")
            _say(" | ".join(parts))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ea4llm-pool")
def cli():
    """Gradient-free (EA4LLM evolution strategies) training of causal language models over a pool."""


def _check_fitness(cfg) -> None:
    """A run whose fitness plugin is not installed here fails before its directory is made."""
    if cfg is not None:
        from .fitness_plugins import load as load_fitness

        load_fitness(cfg.es.fitness)


# --------------------------------------------------------------------------------------------------
def _worker_cmd(endpoint: str, device: str, dtype: str, threads: int, cache: Path, name: str) -> list[str]:
    # --parent-pid: a local worker dies with this process, however this process dies.
    return [sys.executable, "-m", "ea4llm_pool", "worker", "--connect", endpoint, "--device", device,
            "--dtype", dtype, "--threads", str(threads), "--cache", str(cache), "--name", name,
            "--parent-pid", str(os.getpid())]


def _run_pool(cfg, out: Path, resume: bool, iterations, rt, shards: int) -> None:
    import torch

    from .coordinator import Coordinator

    torch.set_num_threads(1)
    workers = rt.workers
    desc = f"{workers} local worker process{'es' if workers != 1 else ''} on {rt.device} ({rt.dtype})"
    # The local workers are this process's own children: vouched for (their values are used as
    # they come); any other worker that joins is checked.
    coord = Coordinator(cfg, out, "tcp://127.0.0.1:0", resume=resume, iterations=iterations, shards=shards,
                        device=rt.device, threads=max(1, rt.threads), say=_say, banner_workers=desc,
                        trust=tuple(f"local-{k}" for k in range(workers)))
    _say(coord.banner)
    _say_yardsticks(out, final=False)
    _say(f"coordinator listening on {coord.endpoint}; more workers can join with:\n  {coord.join_command()}")
    procs = []
    logs = out / "logs"
    logs.mkdir(exist_ok=True)
    for k in range(workers):
        fh = open(logs / f"worker-{k}.log", "a")
        procs.append(subprocess.Popen(_worker_cmd(coord.endpoint, rt.device, rt.dtype, rt.threads,
                                                  out / "worker-cache" / f"local-{k}", f"local-{k}"),
                                      stdout=fh, stderr=subprocess.STDOUT))
    stop = _stop_on_signals()
    progress = Progress(coord.cfg.run.iterations, coord.step)
    coord.progress = progress
    try:
        coord.serve(stop=lambda: stop["flag"] or _all_dead(procs))
    finally:
        stop["restore"]()
        progress.close()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.terminate()
    if not stop["flag"] and coord.step < coord.cfg.run.iterations and _all_dead(procs):
        raise UserError(f"all local workers exited early; see {logs}/worker-*.log")
    _finish_message(out, coord.final["step"], coord.cfg.run.iterations, coord.final["state_hash"])


def _stop_on_signals() -> dict:
    """SIGINT/SIGTERM set ``flag`` (the run stops after the current iteration, checkpointed);
    ``restore()`` puts the previous handlers back."""
    stop = {"flag": False}
    old = {sig: signal.signal(sig, lambda *_: stop.update(flag=True)) for sig in (signal.SIGINT, signal.SIGTERM)}
    stop["restore"] = lambda: [signal.signal(sig, h) for sig, h in old.items()]
    return stop


def _all_dead(procs) -> bool:
    return all(p.poll() is not None for p in procs)


def _say_yardsticks(out, final: bool) -> None:
    from .yardsticks import run_dir_lines

    for line in run_dir_lines(out, final):
        _say(line)


def _finish_message(out: Path, step: int, iterations: int, state_hash: str) -> None:
    from .checkpoint import list_checkpoints

    ck = list_checkpoints(out)
    if step < iterations:
        _say(f"stopped at iteration {step} of {iterations}, state hash {state_hash}; "
             f"continue with: ea4llm-pool train --resume --out {out}")
    else:
        _say(f"done: {step} iterations, state hash {state_hash}")
    _say_yardsticks(out, final=True)
    if ck:
        _say(f"checkpoint: {ck[-1][1]}  (AutoModelForCausalLM.from_pretrained loads it)")
    _say(f"metrics: {out / 'metrics.jsonl'}  loss curve: {out / 'loss.png'}")


@cli.command()
@click.option("--config", "config", type=click.Path(dir_okay=False), help="YAML config (default: embedded default)")
@click.option("--out", type=click.Path(file_okay=False), help="run directory (default: runs/<config name>)")
@click.option("--iterations", type=click.IntRange(min=1), help="override run.iterations")
@click.option("--workers", type=click.IntRange(min=0), help="local worker processes (0 = evaluate in this process)")
@click.option("--device", help="device of the local workers: cpu, cuda, cuda:N, mps")
@click.option("--dtype", type=click.Choice(["fp32", "bf16"]), help="evaluation dtype of the local workers")
@click.option("--threads", type=click.IntRange(min=0), help="torch threads per local worker")
@click.option("--shards", type=click.IntRange(min=1), default=1, show_default=True, help="data shards per member (units per member)")
@click.option("--resume", is_flag=True, help="continue the run in --out from its last checkpoint and log")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="override a config key, e.g. es.sigma=0.02")
@guarded
def train(config, out, iterations, workers, device, dtype, threads, shards, resume, overrides):
    """Train on this machine: a coordinator and local worker processes (the same code as a lab pool)."""
    from .config import load as load_config
    from .replica import resolve_device

    local = {"device": device, "dtype": dtype, "threads": threads, "workers": workers}
    if resume:
        if out is None:
            raise UserError("--resume needs --out (the run directory to continue)")
        if not (Path(out) / "config.yaml").is_file():
            raise UserError(f"--resume: {out} holds no run (no config.yaml)")
        cfg, rt = None, load_config(Path(out) / "config.yaml").runtime
    else:
        cfg = _load_cfg(config, overrides)
        rt = cfg.runtime
    for key, val in local.items():
        if val is not None:
            setattr(rt, key, val)
    out = Path(out) if out else _default_out(config)
    resolve_device(rt.device)  # before anything: a bad device must not leave a half-made run directory
    _check_fitness(cfg)
    if rt.workers > 0:
        _run_pool(cfg, out, resume, iterations, rt, shards)
        return
    _train_inprocess(cfg, out, resume, iterations, rt)


def _train_inprocess(cfg, out: Path, resume: bool, iterations, rt) -> None:
    """``--workers 0``: the run's replica and an evaluation replica in this one process."""
    import torch

    from .checkpoint import list_checkpoints, load_master_into, load_model_skeleton
    from .local import train_inprocess
    from .replay import replay as replay_commits
    from .replica import Replica
    from .run import Run

    run = Run(cfg, out, resume=resume, iterations=iterations, say=_say)
    run.open_reporter()
    try:
        if rt.threads:
            torch.set_num_threads(rt.threads)
        ckpt = list_checkpoints(run.out)[-1][1]
        rep = Replica(load_model_skeleton(ckpt), run.cfg.es, rt.device, rt.dtype, rt.chunk_elements, rt.compile)
        load_master_into(ckpt, rep.master)
        replay_commits(rep, run.log.records(rep.master.step), {rep.master.step: rep.state_hash()})
        _say(run.banner(f"in-process on {rt.device} ({rt.dtype})"))
        _say_yardsticks(run.out, final=False)
        progress = Progress(run.cfg.run.iterations, run.step)
        if run.step == 0:
            progress(run.report_start())
        stop = _stop_on_signals()
        try:
            train_inprocess(run, rep, progress, stop=lambda: stop["flag"])
        finally:
            stop["restore"]()
            progress.close()
    finally:
        run.reporter.close()
    _finish_message(run.out, run.step, run.cfg.run.iterations, run.state_hash)


@cli.command()
@click.option("--config", "config", type=click.Path(dir_okay=False), help="YAML config (default: embedded default)")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="run directory")
@click.option("--bind", default="tcp://*:5555", show_default=True, help="control socket; the bulk channel uses port+1")
@click.option("--iterations", type=click.IntRange(min=1), help="override run.iterations")
@click.option("--shards", type=click.IntRange(min=1), default=1, show_default=True, help="data shards per member")
@click.option("--resume", is_flag=True, help="continue the run in --out from its last checkpoint and log")
@click.option("--device", default="cpu", show_default=True,
              help="device of the reference replica (held-out loss, checkpoints): cpu, cuda:N, mps")
@click.option("--threads", type=click.IntRange(min=0), default=0, help="torch threads of the reference replica (0 = up to 4)")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="override a config key")
@click.option("--keys", type=click.Path(file_okay=False), default=None,
              help="CurveZMQ keys folder: DIR/coordinator.key_secret (made if missing) and DIR/authorized/*.key "
                   "(the workers admitted; re-read while running)")
@click.option("--insecure", is_flag=True, help="allow a non-loopback --bind without --keys (plain TCP: anyone who "
              "reaches the port can join)")
@click.option("--linger", type=click.FloatRange(min=0), default=None,
              help="seconds to keep telling returning workers that the run is over [2 x pool.worker_timeout_s]")
@click.option("--trust", "trust", multiple=True, metavar="NAME",
              help="vouch for a worker (a key name; a worker name in a pool without keys): its fitness values are "
                   "used without replication from the start (also: KEYS/trusted/NAME)")
@guarded
def coordinator(config, out, bind, iterations, shards, resume, device, threads, overrides, keys, insecure, linger,
                trust):
    """Own a run and hand out work to workers that connect (any device, any machine)."""
    from .auth import is_loopback
    from .coordinator import Coordinator, check_bind
    from .replica import resolve_device

    if keys is None and not is_loopback(bind):
        if not insecure:
            raise UserError(f"--bind {bind} is reachable from other machines but no --keys were given, so anyone "
                            "could join, read the run and steer it; pass --keys DIR (see `ea4llm-pool invite "
                            "--help`), bind to 127.0.0.1, or pass --insecure on a network you trust")
        click.echo(f"WARNING: --insecure: {bind} takes plain-TCP workers from anyone who can reach it, without "
                   "authentication or encryption; use --keys DIR on any network you do not fully trust", err=True)
    cfg = None if resume else _load_cfg(config, overrides)
    check_bind(bind)  # before the run directory is made
    resolve_device(device)
    _check_fitness(cfg)
    coord = Coordinator(cfg, out, bind, resume=resume, iterations=iterations, shards=shards, device=device,
                        threads=threads or max(1, min(4, os.cpu_count() or 1)), say=_say, keys=keys,
                        linger_s=linger, trust=trust)
    _say(coord.banner)
    _say_yardsticks(out, final=False)
    _say(f"coordinator listening on {coord.endpoint}; workers join with:\n  {coord.join_command()}")
    stop = _stop_on_signals()
    progress = Progress(coord.cfg.run.iterations, coord.step)
    coord.progress = progress
    try:
        coord.serve(stop=lambda: stop["flag"])
    finally:
        stop["restore"]()
        progress.close()
    _finish_message(Path(out), coord.final["step"], coord.cfg.run.iterations, coord.final["state_hash"])


@cli.command()
@click.option("--connect", default=None, help="coordinator control address, e.g. tcp://host:5555 (default: the invite's)")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:N or mps")
@click.option("--dtype", type=click.Choice(["fp32", "bf16"]), default=None, help="evaluation dtype [bf16 on GPU, else fp32]")
@click.option("--threads", type=click.IntRange(min=0), default=0, help="torch threads (0 = torch default)")
@click.option("--name", default=None, help="name shown by status (default host:pid)")
@click.option("--cache", type=click.Path(file_okay=False), default=None, help="where synced checkpoints are kept")
@click.option("--config", "config", type=click.Path(dir_okay=False), default=None,
              help="refuse to join unless the coordinator runs this config")
@click.option("--invite", type=click.Path(dir_okay=False), default=None,
              help="invite file from `ea4llm-pool invite` (address, this worker's keys, the coordinator's key)")
@click.option("--key", type=click.Path(dir_okay=False), default=None, help="this worker's secret key (NAME.key_secret)")
@click.option("--server-key", type=click.Path(dir_okay=False), default=None,
              help="the coordinator's public key (coordinator.key)")
@click.option("--give-up-after", type=click.FloatRange(min=0, min_open=True), default=600.0, show_default=True,
              help="exit non-zero after this many seconds without reaching any coordinator")
@click.option("--parent-pid", type=int, default=None, hidden=True, help="exit when this process (train) ends")
@guarded
def worker(connect, device, dtype, threads, name, cache, config, invite, key, server_key, give_up_after, parent_pid):
    """Join a coordinator's pool and evaluate members on this device."""
    from .worker import main as worker_main

    creds, connect = _client(connect, invite, key, server_key)
    if dtype is None:
        dtype = "bf16" if device.startswith("cuda") else "fp32"
    cfg = _load_cfg(config, ()) if config else None
    sys.exit(worker_main(connect, device, dtype, threads, name or (creds.name if creds else None), cache, cfg,
                         credentials=creds, give_up_after=give_up_after, parent_pid=parent_pid))


def _client(connect: Optional[str], invite: Optional[str], key: Optional[str], server_key: Optional[str]):
    """(credentials or None, address) from a client's --connect/--invite/--key/--server-key."""
    from .auth import client_credentials

    creds = client_credentials(invite, key, server_key)
    connect = connect or (creds.connect if creds is not None else None)
    if not connect:
        raise UserError("--connect is required (or an --invite, which holds the address)")
    from .link import check_endpoint

    return creds, check_endpoint(connect)


@cli.command()
@click.option("--connect", default=None, help="coordinator control address, e.g. tcp://host:5555")
@click.option("--timeout", type=float, default=5.0, show_default=True, help="seconds to wait for an answer")
@click.option("--json", "as_json", is_flag=True, help="print the raw snapshot as JSON")
@click.option("--invite", type=click.Path(dir_okay=False), default=None, help="a worker's invite file (pool with keys)")
@click.option("--key", type=click.Path(dir_okay=False), default=None,
              help="an authorized secret key, e.g. KEYS/coordinator.key_secret on the coordinator's host")
@click.option("--server-key", type=click.Path(dir_okay=False), default=None, help="the coordinator's public key")
@guarded
def status(connect, timeout, as_json, invite, key, server_key):
    """Show a coordinator's workers, iteration and counters."""
    import json

    import zmq

    from . import protocol as P

    from .link import check_endpoint

    creds, connect = _client(connect, invite, key, server_key)
    check_endpoint(connect)
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    P.configure_socket_limits(sock)
    if creds is not None:
        creds.apply(sock)
    try:
        sock.connect(connect)
    except zmq.ZMQError as err:
        sock.close(linger=0)
        raise UserError(f"cannot connect to '{connect}': {err.strerror} (use tcp://HOST:PORT)") from None
    sock.send(P.encode(P.STATUS_REQ))
    if not sock.poll(int(timeout * 1000)):
        sock.close(linger=0)
        raise UserError(f"no answer from {connect} within {timeout:g} s (is the coordinator running?)")
    msg = P.decode(sock.recv())
    sock.close(linger=0)
    if msg.type != P.STATUS:
        raise UserError(f"the coordinator answered {msg.type}: {msg.get('reason') or 'no status'}")
    snap = msg.snapshot
    if as_json:
        click.echo(json.dumps(snap, indent=1, sort_keys=True))
        return
    click.echo(f"iteration {snap['iteration']}/{snap['iterations']}  {snap['iterations_per_minute']:.2f} it/min  "
               f"state {snap['state_hash'][:12]}")
    c = snap["counters"]
    click.echo("counters: " + ", ".join(f"{k} {v}" for k, v in sorted(c.items())))
    sec = snap.get("security") or {}
    click.echo(f"security: {'CurveZMQ, ' + str(sec.get('authorized_keys')) + ' authorized keys' if sec.get('keys') else 'plain TCP (no keys)'}"
               f"; malformed frames {c.get('malformed', 0)}, throttled {c.get('throttled', 0)}, bans {c.get('bans', 0)}")
    ver = snap.get("verify") or {}
    if ver.get("on"):
        click.echo(f"verify: checks {ver['checks']}, disagreements {ver['disagreements']}, wrong answers "
                   f"{ver['wrong_answers']}, quarantines {ver['quarantines']}, bans {ver['verify_bans']}; reference "
                   f"replica {'checks' if ver['keeper_verifies'] else 'does not check'} units")
    else:
        click.echo("verify: off (fitness values are not checked)")
    click.echo(f"{'worker':<24}{'key':<14}{'device':<10}{'dtype':<6}{'thr':>4}{'samples/s':>11}{'seen':>7}{'iter':>7}"
               f"{'bad':>5}  agrees  {'trust':<12}{'wrong':>5}")
    for w in snap["workers"]:
        click.echo(f"{w['name'][:23]:<24}{(w.get('key') or '-')[:13]:<14}{w['device']:<10}{w['dtype']:<6}"
                   f"{w['threads']:>4}{w['throughput']:>11.1f}{w['last_seen_s']:>6.1f}s{w['iteration']:>7}"
                   f"{w.get('malformed', 0):>5}  {'yes   ' if w['state_agrees'] else 'NO    '}  "
                   f"{w.get('trust', '-'):<12}{w.get('wrong_answers', 0):>5}")
    for o in sec.get("offenders") or []:
        click.echo(f"offender {o['peer'][:40]}: malformed {o['malformed']}, strikes {o['strikes']}, bans {o['bans']}, "
                   f"throttled {o['throttled']}, dropped while banned {o['dropped_banned']} ({o['last_reason'][:80]})")


@cli.command()
@click.option("--out", required=True, type=click.Path(file_okay=False), help="folder for the key pair")
@click.option("--name", required=True, help="key name: writes NAME.key (public) and NAME.key_secret")
@guarded
def keygen(out, name):
    """Write a CurveZMQ key pair (pyzmq's certificate format) for a coordinator or a worker."""
    from .auth import keygen as make_pair

    public, secret = make_pair(out, name)
    click.echo(f"public key: {public}\nsecret key: {secret} (keep it private)")


@cli.command()
@click.argument("name")
@click.option("--keys", default="keys", show_default=True, type=click.Path(file_okay=False),
              help="the coordinator's keys folder (made, with a coordinator key pair, if missing)")
@click.option("--connect", default=None, help="address workers reach the coordinator at [tcp://THIS_HOST:5555]")
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="invite file [KEYS/invites/NAME.invite]")
@click.option("--reuse", is_flag=True, help="keep an existing invite of that name instead of failing")
@click.option("--trusted", is_flag=True, help="vouch for this worker: its fitness values are used without "
              "replication from the start (for your own machines)")
@guarded
def invite(name, keys, connect, out, reuse, trusted):
    """Admit a new worker: a key pair for it, its public key in KEYS/authorized/, and one invite file
    (address, its keys, the coordinator's public key) to hand to it. Revoke by deleting
    KEYS/authorized/NAME.key; a running coordinator cuts the worker off at once."""
    from .auth import default_connect, write_invite

    path = write_invite(keys, name, connect or default_connect(), out, reuse=reuse, trusted=trusted)
    click.echo(f"invite for {name}: {path} (holds the worker's secret key: hand it over privately)")
    click.echo(f"on the worker's machine:\n  ea4llm-pool worker --invite {path.name} --device cpu")


# --------------------------------------------------------------------------------------------------
def _load_checkpoint_replica(path: str, device: str = "cpu", dtype: str = "fp32"):
    from .checkpoint import load_master_into, read_meta, resolve
    from .config import load
    from .checkpoint import load_model_skeleton
    from .replica import Replica

    ckpt = resolve(path)
    meta = read_meta(ckpt)
    cfg_path = ckpt / "run_config.yaml"
    cfg = load(cfg_path) if cfg_path.is_file() else load()
    model = load_model_skeleton(ckpt)
    cfg.es.optimizer = meta.get("optimizer", cfg.es.optimizer)
    rep = Replica(model, cfg.es, device, dtype, compile=cfg.runtime.compile)
    load_master_into(ckpt, rep.master)
    return ckpt, meta, cfg, rep


@cli.command("eval")
@click.option("--checkpoint", "ckpt", required=True, type=click.Path(), help="checkpoint dir, or a run dir (latest checkpoint)")
@click.option("--data", default=None, help="corpus to evaluate (default: the run's held-out split)")
@click.option("--samples", type=click.IntRange(min=1), default=256, show_default=True, help="held-out samples to use")
@click.option("--device", default="cpu", show_default=True)
@guarded
def eval_cmd(ckpt, data, samples, device):
    """Print held-out loss (negated fitness, nats per token) and perplexity of a checkpoint."""
    import math

    from transformers import AutoTokenizer

    from .data import load_texts, prepare_samples
    from .model import check_seq_len

    path, meta, cfg, rep = _load_checkpoint_replica(ckpt, device)
    try:
        tok = AutoTokenizer.from_pretrained(str(path))
    except Exception as err:
        raise UserError(f"{path}: cannot load its tokenizer: {str(err).splitlines()[0]}") from None
    if data:
        cfg.data.source = data
    check_seq_len(rep.model, cfg.data.seq_len)
    _, heldout = prepare_samples(cfg, tok, load_texts(cfg))
    n = min(samples, len(heldout))
    ids, mask = heldout.batch(range(n))
    s, c = rep.evaluate_center(ids, mask, cfg.es.micro_batch)
    loss = -s / c
    click.echo(f"{path}: held-out loss {loss:.4f} nats/token, perplexity {math.exp(loss):.2f} "
               f"({n} samples × {cfg.data.seq_len} tokens, iteration {meta.get('step')})")


@cli.command()
@click.option("--run", "run_dir", required=True, type=click.Path(), help="run directory")
@click.option("--to", "to", type=click.IntRange(min=0), default=None, help="rebuild the weights after this many iterations")
@click.option("--save", type=click.Path(file_okay=False), default=None, help="also write the rebuilt weights as a checkpoint")
@guarded
def replay(run_dir, to, save):
    """Rebuild the weights from a checkpoint plus the commit log and print the state hash."""
    from .checkpoint import list_checkpoints, save as save_ckpt
    from .runlog import CommitLog
    from .run import LOG_NAME

    root = Path(run_dir)
    if not (root / LOG_NAME).is_file():
        raise UserError(f"{root} is not a run directory (no {LOG_NAME})")
    log = CommitLog(root / LOG_NAME, readonly=True)
    last = log.last()
    end = (last["iteration"] + 1) if last else 0
    target = end if to is None else to
    if target > end:
        raise UserError(f"--to {target}: the log only reaches iteration {end}")
    found = [(s, d) for s, d in list_checkpoints(root) if s <= target]
    if not found:
        raise UserError(f"{root} has no checkpoint at or before iteration {target}")
    ckpt_step, ckpt = found[-1]
    ckpt, meta, cfg, rep = _load_checkpoint_replica(str(ckpt))
    from .replay import replay as replay_commits

    n = replay_commits(rep, log.records(ckpt_step), {rep.master.step: rep.state_hash()}, to_step=target)
    click.echo(f"replayed {ckpt.name} + {n} commits → iteration {rep.master.step}")
    click.echo(f"state hash {rep.state_hash()}")
    if save:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(ckpt))
        save_ckpt(Path(save), rep.model, rep.master, tok, {"state_hash": rep.state_hash(), "config_hash": cfg.config_hash()},
                  cfg.to_yaml())
        click.echo(f"saved {save}")


@cli.command("hash")
@click.option("--checkpoint", "ckpt", required=True, type=click.Path(), help="checkpoint dir, or a run dir (latest)")
@guarded
def hash_cmd(ckpt):
    """Print a checkpoint's state hash (and whether it matches the one recorded beside it)."""
    path, meta, cfg, rep = _load_checkpoint_replica(ckpt)
    h = rep.state_hash()
    click.echo(h)
    if meta.get("state_hash") and meta["state_hash"] != h:
        _fail(f"{path}: weights hash to {h}, but {meta['state_hash']} is recorded beside them", 1)


# --------------------------------------------------------------------------------------------------
@cli.command()
@click.option("--config", "config", type=click.Path(dir_okay=False),
              help="experiment YAML (default: configs/experiment.yaml)")
@click.option("--budget", help="per method: forward tokens (4M, 500k, 4000000) or minutes (3min)")
@click.option("--out", type=click.Path(file_okay=False), help="experiment directory (default: runs/experiment)")
@click.option("--only", multiple=True, metavar="NAME", help="run only these methods (repeat, or a,b,c); "
              "in an existing experiment without --resume they are re-run from scratch")
@click.option("--resume", is_flag=True, help="continue the experiment in --out (finished methods are kept)")
@click.option("--parallel", type=click.IntRange(min=1), help="methods run side by side (default: the config's)")
@click.option("--workers", type=click.IntRange(min=0), help="ES methods through `train --workers K` (0 = in-process)")
@guarded
def experiment(config, budget, out, only, resume, parallel, workers):
    """Run the paper's variants, the default, AdamW, MeZO and the extra options on one init, data and budget."""
    from .experiment import parse_budget, run_experiment

    if budget is not None:
        parse_budget(budget)  # a bad budget fails before anything is made
    if resume and out is None:
        raise UserError("--resume needs --out (the experiment directory to continue)")
    out = Path(out) if out else _default_out("experiment")
    run_experiment(config, budget, out, tuple(only), resume, parallel, workers, say=_say)


def main():
    from . import quiet_transformers

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    quiet_transformers()
    cli(prog_name="ea4llm-pool")


if __name__ == "__main__":
    main()
