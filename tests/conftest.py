"""Shared test fixtures. Tests never download anything and never inherit cluster variables."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import lightning  # noqa: F401  (first import here: its log handler must not bind a test's captured stderr)
import pytest

REPO = Path(__file__).resolve().parents[1]

_CLUSTER_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK")


def clean_env(**extra: str) -> dict[str, str]:
    """The environment for a subprocess: no SLURM/torchrun variables, offline, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in _CLUSTER_VARS}
    env.update(HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", **extra)
    return env


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Prepared data goes to a per-session cache (subprocesses inherit it), never ~/.cache."""
    os.environ["MOEFRAME_CACHE"] = str(tmp_path_factory.mktemp("moeframe-cache"))


@pytest.fixture(autouse=True)
def _no_cluster_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("SLURM_") or key in _CLUSTER_VARS:
            monkeypatch.delenv(key, raising=False)


@pytest.fixture
def moeframe_cmd() -> list[str]:
    """The installed console script, run with this interpreter."""
    return [sys.executable, "-m", "moeframe.cli"]


# -- bad inputs tried by this test run (tests marked ``bad_input``), printed in the summary --------
_BAD_INPUTS: dict[str, str] = {}


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when == "call" and "bad_input" in report.keywords:
        _BAD_INPUTS[report.nodeid] = report.outcome


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if _BAD_INPUTS:
        # a skipped case was not tried: it is reported apart, never in the count of inputs tried
        skipped = sum(outcome == "skipped" for outcome in _BAD_INPUTS.values())
        passed = sum(outcome == "passed" for outcome in _BAD_INPUTS.values())
        line = f"bad inputs tried: {len(_BAD_INPUTS) - skipped} ({passed} handled with one clear line)"
        terminalreporter.write_line(
            line + (f"; {skipped} not tried here (skipped, see the reasons)" if skipped else "")
        )
