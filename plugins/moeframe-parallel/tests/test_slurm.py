"""A fake SLURM job step: two ``moeframe fit`` processes started with the variables ``srun`` sets
(1 node x 2 tasks). Lightning must pick its SLURMEnvironment (ranks from SLURM_PROCID, no
launcher of its own) and install the auto-requeue handler: on SIGUSR1, which
``#SBATCH --signal=SIGUSR1@90`` sends before the time limit, it writes ``hpc_ckpt_1.ckpt`` and
asks ``scontrol requeue <job id>`` (a stand-in on PATH records the call).
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from moeframe.testing import TINY_RUN_FLAGS

_spec = importlib.util.spec_from_file_location("_ptest_helpers", Path(__file__).with_name("_helpers.py"))
helpers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(helpers)

CONFIG = helpers.REPO / "configs" / "pretrain" / "tiny-parallel.yaml"
JOB_ID = "4242"


def slurm_env(rank: int, port: int, bin_dir: Path, cache: Path) -> dict[str, str]:
    return helpers.clean_env(
        SLURM_JOB_ID=JOB_ID,
        SLURM_JOB_NAME="moeframe-test",
        SLURM_NTASKS="2",
        SLURM_NTASKS_PER_NODE="2",
        SLURM_NNODES="1",
        SLURM_NODELIST="localhost",
        SLURM_PROCID=str(rank),
        SLURM_LOCALID=str(rank),
        SLURM_NODEID="0",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        MOEFRAME_CACHE=str(cache),
        PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
    )


def wait_for(path: Path, procs: list[subprocess.Popen], limit_s: float) -> None:
    deadline = time.monotonic() + limit_s
    while not path.exists():
        if any(p.poll() is not None for p in procs):
            raise AssertionError(f"a rank exited early waiting for {path.name}:\n" + read_logs(procs))
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} did not appear:\n" + read_logs(procs))
        time.sleep(0.5)


def read_logs(procs: list[subprocess.Popen]) -> str:
    for p in procs:
        if p.poll() is None:
            p.kill()
    return "\n".join((p.communicate(timeout=30)[0] or "")[-3000:] for p in procs)


@pytest.mark.slow
def test_sigusr1_checkpoints_and_requeues_under_slurm(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "scontrol_calls.txt"
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    scontrol.chmod(0o755)
    root = tmp_path / "run"
    port = helpers.free_port()
    cmd = [
        sys.executable,
        "-m",
        "moeframe.cli",
        "fit",
        "-c",
        str(CONFIG),
        "--trainer.strategy",
        "ddp",
        "--trainer.max_steps",
        "100000",
        "--trainer.default_root_dir",
        str(root),
        *TINY_RUN_FLAGS,
    ]
    procs = [
        subprocess.Popen(
            cmd,
            env=slurm_env(rank, port, bin_dir, tmp_path / "cache"),
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(2)
    ]
    try:
        # metrics are on disk: training runs, the signal handlers are installed
        wait_for(root / "logs" / "version_0" / "metrics.csv", procs, limit_s=240)
        for p in procs:  # SLURM signals every task of the step
            p.send_signal(signal.SIGUSR1)
        hpc = root / "hpc_ckpt_1.ckpt"
        wait_for(calls, procs, limit_s=120)
        assert hpc.exists()  # Lightning saves before it requeues
    finally:
        logs = read_logs(procs)
    assert calls.read_text().split() == ["requeue", JOB_ID], logs
    ckpt = torch.load(hpc, map_location="cpu", weights_only=False)
    assert ckpt["global_step"] >= 1
    assert any(k.endswith("experts.w1") for k in ckpt["state_dict"])
    # Lightning chose its SLURMEnvironment and took the ranks from SLURM_PROCID
    assert "SLURM auto-requeueing enabled" in logs, logs[-2000:]
    assert "GLOBAL_RANK: 0, MEMBER: 1/2" in logs and "GLOBAL_RANK: 1, MEMBER: 2/2" in logs, logs[-2000:]
