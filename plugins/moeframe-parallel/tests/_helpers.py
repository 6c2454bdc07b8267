"""Shared by this plugin's tests: clean subprocess environments, free ports, two-rank launches."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
HERE = Path(__file__).resolve().parent
_CLUSTER = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK")


def clean_env(**extra: str) -> dict[str, str]:
    """No SLURM/torchrun variables (they change Lightning's launcher), offline, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in _CLUSTER}
    env.update(HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", **extra)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_ranks(script: str, out: Path, extra_args: list[str], timeout_s: float) -> list[dict]:
    """Start ``script`` as ranks 0 and 1 of a gloo job (``script RANK 2 PORT OUT.pt *extra_args``),
    wait for both, and return what each saved; a failing rank fails with both logs."""
    import torch

    port = str(free_port())
    procs = [
        subprocess.Popen(
            [sys.executable, str(HERE / script), str(r), "2", port, str(out / f"{r}.pt"), *extra_args],
            env=clean_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(2)
    ]
    logs = [p.communicate(timeout=timeout_s)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)
    return [torch.load(out / f"{r}.pt") for r in range(2)]
