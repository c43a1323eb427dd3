"""Two local processes joined by jax.distributed.initialize (coordinator on 127.0.0.1), two CPU
devices each: each loads only its own shards of a checkpoint from disk, and one data-parallel
and one FSDP training step give the single-process loss and updated parameters.

The processes run tests/multiprocess_worker.py under a timeout and are killed (by their own
pids) if anything hangs, so a broken collective fails the test instead of stalling CI."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import flaxauto
from multiprocess_common import batch_for, train_step
from references import torch_model

HERE = Path(__file__).resolve().parent
PROCESSES = 2
TIMEOUT = 420  # seconds for both processes, compilation included (2 shared cores: slow)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_workers(checkpoint: Path, out: Path) -> list[dict]:
    coordinator = f"127.0.0.1:{_free_port()}"
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
        "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
    }
    workers = [
        subprocess.Popen(
            [
                sys.executable,
                str(HERE / "multiprocess_worker.py"),
                coordinator,
                str(PROCESSES),
                str(pid),
                str(checkpoint),
                str(out / f"{pid}.npz"),
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for pid in range(PROCESSES)
    ]
    logs = []
    try:
        for worker in workers:
            logs.append(worker.communicate(timeout=TIMEOUT)[0])
    except subprocess.TimeoutExpired:
        for worker in workers:
            worker.kill()
        logs = [worker.communicate()[0] for worker in workers]
        pytest.fail("the processes did not finish in time:\n" + "\n---\n".join(logs))
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait()
    for worker, log in zip(workers, logs, strict=True):
        assert worker.returncode == 0, log[-3000:]
    return [dict(np.load(out / f"{pid}.npz")) for pid in range(PROCESSES)]


def test_two_processes_match_one(tmp_path):
    checkpoint = tmp_path / "checkpoint"
    reference = torch_model("bert", "sequence-classification")
    reference.save_pretrained(checkpoint)
    results = _run_workers(checkpoint, tmp_path)

    model = flaxauto.AutoModelForSequenceClassification.from_pretrained(checkpoint)
    loss, params = train_step(model, batch_for(model.config))
    expected = [np.asarray(x) for x in jax.tree.leaves(params)]
    total = sum(x.size for x in expected)
    for pid, result in enumerate(results):
        assert tuple(result["devices"]) == (4, 2)
        for preset in ("data", "fsdp"):
            assert abs(float(result[f"{preset}_loss"]) - float(loss)) <= 1e-5, (pid, preset)
            for index, want in enumerate(expected):
                got = result[f"{preset}_param_{index}"]
                np.testing.assert_allclose(got, want, atol=1e-5, err_msg=f"{pid} {preset}")
        # data parallel: every process reads every tensor; FSDP: about its half of each
        assert result["data_read"] >= total
        assert result["fsdp_read"] < 0.75 * total, (result["fsdp_read"], total)
