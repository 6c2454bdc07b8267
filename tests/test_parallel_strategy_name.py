"""An unknown ``--trainer.strategy`` name: one line with a did-you-mean, exit status 2."""

from __future__ import annotations

import subprocess
from pathlib import Path

from .conftest import REPO, clean_env


def test_unknown_strategy_name_suggests_the_close_one(tmp_path: Path, moeframe_cmd: list[str]) -> None:
    result = subprocess.run(
        [*moeframe_cmd, "fit", "-c", str(REPO / "configs" / "pretrain" / "tiny.yaml"), "--trainer.strategy", "zero4"],
        env=clean_env(),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "unknown trainer.strategy 'zero4'. Did you mean 'zero3'?" in result.stderr
    assert "moeframe.strategy" in result.stderr and "Traceback" not in result.stderr
