"""A worker that lacks the run's fitness plugin is refused at HELLO with the reason, and exits.

The coordinator sees a plugin ``my-reward`` (a package's metadata and module on its PYTHONPATH); the
worker's environment does not, so its HELLO lists only what it has installed.
"""

from __future__ import annotations

import os

import pytest

from pooltools import Proc, cli, free_port_pair, wait_until, write_config

pytestmark = pytest.mark.slow


def _plugin_package(root):
    root.mkdir()
    (root / "my_rewards.py").write_text("import torch\n"
                                        "def length(model, ids, mask):\n"
                                        "    return mask.sum(dim=1).to(torch.float32)\n")
    info = root / "my_rewards-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: my_rewards\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[ea4llm_pool.fitness]\nmy-reward = my_rewards:length\n")


def test_a_worker_without_the_runs_fitness_plugin_is_rejected_with_the_names_it_has(tmp_path):
    _plugin_package(tmp_path / "site")
    cfg = write_config(tmp_path / "pool.yaml", run={"iterations": 2}, es={"fitness": "my-reward"})
    port = free_port_pair()
    path = os.pathsep.join([str(tmp_path / "site"), os.environ.get("PYTHONPATH", "")])
    c = Proc(cli("coordinator", "--config", cfg, "--out", tmp_path / "run", "--bind", f"tcp://127.0.0.1:{port}"),
             tmp_path / "coordinator.log", env={"PYTHONPATH": path})
    try:
        wait_until(lambda: "listening on" in c.text(), 120, "the coordinator to listen", [c])
        w = Proc(cli("worker", "--connect", f"tcp://127.0.0.1:{port}", "--device", "cpu", "--threads", 1,
                     "--name", "plain", "--cache", tmp_path / "cache"), tmp_path / "worker.log")
        rc = w.wait(120)
        text = w.text()
        assert rc == 2, text
        assert ("rejected by the coordinator: this run's fitness 'my-reward' is not installed on the worker "
                "(it has: logprob, token-accuracy)") in text, text
        assert "Traceback" not in text
        assert "rejected plain: this run's fitness 'my-reward'" in c.text()
    finally:
        c.kill()
