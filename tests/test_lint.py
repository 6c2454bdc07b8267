"""The code base passes the linter and the formatter configured in pyproject.toml (``[tool.ruff]``).

A failure lists the offending lines (the linter's findings, the formatter's diff). Most are fixed by
``scripts/lint-fix.sh`` (the formatter and the safe fixes); what it leaves needs a hand.
"""

from __future__ import annotations

import subprocess
import sys
import tomllib

from .conftest import REPO, clean_env

MAX_REPORT = 8000  # characters of findings shown; the command prints them all


def _ruff(*args: str) -> subprocess.CompletedProcess:
    # --no-cache: a test run leaves nothing in the repository
    return subprocess.run(
        [sys.executable, "-m", "ruff", *args, "--no-cache", "."],
        cwd=REPO,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )


def _report(result: subprocess.CompletedProcess, fix: str) -> str:
    text = (result.stdout + result.stderr).strip()
    cut = f"\n... ({len(text) - MAX_REPORT} more characters)" if len(text) > MAX_REPORT else ""
    return f"{text[:MAX_REPORT]}{cut}\nfix: {fix}"


def test_ruff_is_configured_with_the_line_length_and_rules() -> None:
    ruff = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["ruff"]
    assert ruff["line-length"] == 120
    assert {"E", "F", "W", "I", "B", "UP"} <= set(ruff["lint"]["select"])


def test_ruff_check_passes() -> None:
    result = _ruff("check", "--output-format", "concise")
    assert result.returncode == 0, _report(result, "bash scripts/lint-fix.sh, then fix what it lists by hand")


def test_ruff_format_leaves_every_file_as_it_is() -> None:
    result = _ruff("format", "--diff")
    assert result.returncode == 0, _report(result, "bash scripts/lint-fix.sh (or python -m ruff format .)")
