"""The embedded default corpus: the Python standard library's own source files.

Always present wherever moeframe runs, nothing to download, a few MB of real, structured text.
Files are listed in sorted relative-path order so every run and every machine with the same
Python sees the same stream.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path) -> list[Path]:
    """The stdlib's ``.py`` files (third-party site-packages excluded), sorted."""
    files = [p for p in root.rglob("*.py") if "site-packages" not in p.relative_to(root).parts]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())
