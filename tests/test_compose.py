"""Deployment files: docker-compose.yml, the worker Dockerfiles and the container health check.

No Docker needed: the compose file is read as YAML, each service's command is parsed by the real
CLI (click's make_context: arguments checked, nothing run), and the health check is exercised
against a stand-in coordinator socket.
"""

from __future__ import annotations

import re
import shlex
import threading
from pathlib import Path

import pytest
import yaml
import zmq

from ea4llm_pool import protocol as P
from ea4llm_pool.cli import cli

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILES = [ROOT / "workers" / "Dockerfile.cpu", ROOT / "workers" / "Dockerfile.cuda"]

_VAR = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}")


def substitute_defaults(text: str) -> str:
    """Compose interpolation as on a host with none of the variables set: ${VAR:-default} → default."""
    return _VAR.sub(lambda m: m.group(2) or "", text)


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(substitute_defaults(COMPOSE.read_text()))


def test_substitution_uses_the_defaults():
    assert substitute_defaults("a ${X:-configs/d.yaml} ${Y-2} ${Z}") == "a configs/d.yaml 2 "


def test_compose_has_a_coordinator_and_cpu_and_gpu_workers(compose):
    assert {"coordinator", "worker-cpu", "worker-gpu"} <= set(compose["services"])
    assert "runs" in compose["volumes"]


def test_coordinator_publishes_the_control_port_and_the_bulk_port_after_it(compose):
    c = compose["services"]["coordinator"]
    assert "5555-5556:5555-5556" in c["ports"]
    assert any(v.split(":")[1] == "/runs" for v in c["volumes"])
    assert "--bind tcp://*:5555" in c["command"] and "/runs/lab" in c["command"]


def test_gpu_worker_reserves_one_nvidia_gpu_under_the_gpu_profile(compose):
    g = compose["services"]["worker-gpu"]
    assert g["profiles"] == ["gpu"]  # so CPU-only hosts can `docker compose up`
    assert g["deploy"]["resources"]["reservations"]["devices"] == [
        {"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert "--device cuda:0" in g["command"] and "--dtype bf16" in g["command"]
    assert g["build"]["dockerfile"] == "workers/Dockerfile.cuda"


def test_cpu_workers_scale_by_replicas_and_wait_for_a_healthy_coordinator(compose):
    w = compose["services"]["worker-cpu"]
    assert int(w["deploy"]["replicas"]) >= 1
    assert "--device cpu" in w["command"] and "--threads 1" in w["command"]
    for name in ("worker-cpu", "worker-gpu"):
        dep = compose["services"][name]["depends_on"]["coordinator"]
        assert dep["condition"] == "service_healthy"


@pytest.mark.parametrize("service", ["coordinator", "worker-cpu", "worker-gpu"])
def test_every_service_has_a_healthcheck_that_runs_the_shipped_script(compose, service):
    hc = compose["services"][service]["healthcheck"]
    test = hc["test"]
    assert test[0] == "CMD" and "workers/healthcheck.py" in test
    assert hc["interval"] and hc["timeout"] and hc["retries"] >= 1


@pytest.mark.parametrize("service", ["coordinator", "worker-cpu", "worker-gpu"])
def test_every_service_command_is_accepted_by_the_real_cli(compose, service):
    argv = shlex.split(compose["services"][service]["command"])
    assert argv[0] == "ea4llm-pool"
    name, rest = argv[1], argv[2:]
    command = cli.commands[name]
    with cli.make_context("ea4llm-pool", [name], resilient_parsing=True) as parent:
        ctx = command.make_context(name, list(rest), parent=parent)  # raises on a bad flag or value
    if name == "coordinator":
        assert (ROOT / ctx.params["config"]).is_file()
        assert ctx.params["bind"] == "tcp://*:5555"
    else:
        assert ctx.params["connect"] == "tcp://coordinator:5555"


def test_dockerfiles_copy_only_files_that_exist():
    for dockerfile in DOCKERFILES:
        text = dockerfile.read_text()
        copies = re.findall(r"^COPY\s+(.+)$", text, flags=re.M)
        assert copies, dockerfile.name
        for line in copies:
            *sources, _dest = shlex.split(line)
            for src in sources:
                if not src.startswith("--"):
                    assert (ROOT / src).exists(), f"{dockerfile.name}: COPY {src} (missing)"
        assert "workers/healthcheck.py" in text


def test_cuda_dockerfile_builds_on_a_cuda_image_with_a_cuda_torch():
    text = DOCKERFILES[1].read_text()
    assert re.search(r"^FROM nvidia/cuda:\S+", text, flags=re.M)
    assert re.search(r"download\.pytorch\.org/whl/cu\d+", text)


def test_compose_builds_from_dockerfiles_that_exist(compose):
    for name, svc in compose["services"].items():
        if "build" in svc:
            assert (ROOT / svc["build"]["context"] / svc["build"]["dockerfile"]).is_file(), name


# -- the health check itself -----------------------------------------------------------------------
def _healthcheck():
    import importlib.util

    spec = importlib.util.spec_from_file_location("healthcheck", ROOT / "workers" / "healthcheck.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_healthcheck_is_healthy_when_the_coordinator_answers_status(capsys):
    ctx = zmq.Context.instance()
    router = ctx.socket(zmq.ROUTER)
    port = router.bind_to_random_port("tcp://127.0.0.1")

    def answer():
        if router.poll(5000):
            ident, frame = router.recv_multipart()
            assert P.decode(frame).type == P.STATUS_REQ
            router.send_multipart([ident, P.encode(P.STATUS, snapshot={"iteration": 3, "iterations": 10,
                                                                        "workers": []})])

    t = threading.Thread(target=answer)
    t.start()
    try:
        assert _healthcheck().main(["--connect", f"tcp://127.0.0.1:{port}", "--timeout", "5"]) == 0
    finally:
        t.join()
        router.close(linger=0)
    assert capsys.readouterr().out.startswith("healthy: ")


def test_healthcheck_is_unhealthy_when_nobody_answers(capsys):
    ctx = zmq.Context.instance()
    s = ctx.socket(zmq.ROUTER)
    port = s.bind_to_random_port("tcp://127.0.0.1")
    s.close(linger=0)  # a free port nobody listens on
    assert _healthcheck().main(["--connect", f"tcp://127.0.0.1:{port}", "--timeout", "0.2"]) == 1
    out = capsys.readouterr().out
    assert out.startswith("unhealthy: ") and out.count("\n") == 1
