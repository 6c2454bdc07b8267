"""Logger version folders (``<root>/logs/version_N``) claimed atomically.

Lightning's CSV and TensorBoard loggers pick their version by listing the folder and taking the
highest ``version_N`` plus one, and create it only when they first write. Two runs started together
in the same ``default_root_dir`` therefore both take ``version_0`` and write into each other's
``metrics.csv`` (and crash on its columns). Here a run claims its version by creating the folder:
``os.mkdir`` succeeds for exactly one of the processes trying the same N, the others move on to
N + 1. The CLI claims once per run (on rank 0) and hands the number to every default logger, so the
CSV and TensorBoard logs of one run share one folder. Standard library only.
"""

from __future__ import annotations

import os
from pathlib import Path

VERSION_PREFIX = "version_"


def next_free_version(logs_dir: Path) -> int:
    """Lightning's rule: one more than the highest ``version_N`` folder, 0 when there is none."""
    numbers = (
        [
            int(p.name[len(VERSION_PREFIX) :])
            for p in logs_dir.glob(f"{VERSION_PREFIX}*")
            if p.is_dir() and p.name[len(VERSION_PREFIX) :].isdigit()
        ]
        if logs_dir.is_dir()
        else []
    )
    return max(numbers, default=-1) + 1


def claim_log_version(logs_dir: Path) -> int:
    """Create the next free ``logs_dir/version_N`` and return N; never one another process created."""
    logs_dir.mkdir(parents=True, exist_ok=True)
    version = next_free_version(logs_dir)
    while True:
        try:
            os.mkdir(logs_dir / f"{VERSION_PREFIX}{version}")
            return version
        except FileExistsError:  # another run claimed it between the listing and now
            version += 1


def release_log_version(logs_dir: Path, version: int) -> None:
    """Give a claimed version back while it is still empty (the run stopped at config time)."""
    try:
        os.rmdir(logs_dir / f"{VERSION_PREFIX}{version}")
    except OSError:  # written to meanwhile, or already gone: keep what is there
        pass
