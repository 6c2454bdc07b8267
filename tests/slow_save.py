"""Test-only: widen the window of an atomic checkpoint save in which the new file is fully
written under its hidden name but not yet renamed over the target, so a test can kill or signal
the process right there. Patches ``checkpoint_io._rename_into_place`` (the commit point of a
save) in this process; used by subprocess children (``install`` first thing) and fixtures."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path


def install(delay_s: float, marker: str = "") -> Callable[[], None]:
    """Every save writes ``marker`` (if given) and sleeps ``delay_s`` before its rename; returns
    a function that undoes the patch."""
    from moeframe.training import checkpoint_io

    original = checkpoint_io._rename_into_place

    def slow_rename(tmp: Path, path: Path) -> None:
        if marker:
            Path(marker).write_text("saving")
        time.sleep(delay_s)
        original(tmp, path)

    checkpoint_io._rename_into_place = slow_rename

    def undo() -> None:
        checkpoint_io._rename_into_place = original

    return undo
