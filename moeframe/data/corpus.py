"""Where text comes from: the embedded default corpus, or the user's file or folder.

The default corpus is the Python standard library's own source, read from the running
interpreter's stdlib folder: always present, nothing to download, a few MB of real,
structured text. Files are read in sorted relative-path order so every run sees the same stream.
"""

from __future__ import annotations

import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from moeframe.config import ConfigError


@dataclass(frozen=True)
class Document:
    name: str  # a stable identifier (relative path), used for the held-out split
    data: bytes


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _stdlib_files(root: Path) -> list[Path]:
    files = [p for p in root.rglob("*.py") if "site-packages" not in p.relative_to(root).parts]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def stdlib_documents(max_bytes: int | None) -> Iterator[Document]:
    """Python stdlib sources in sorted order, stopping once ``max_bytes`` have been read."""
    root = stdlib_root()
    total = 0
    for path in _stdlib_files(root):
        if max_bytes is not None and total >= max_bytes:
            return
        data = path.read_bytes()
        total += len(data)
        yield Document(path.relative_to(root).as_posix(), data)


def _looks_like_text(path: Path) -> bool:
    with path.open("rb") as f:
        head = f.read(8192)
    return b"\0" not in head


def user_files(path: Path) -> list[Path]:
    """The text files under ``path`` (a file, or a folder searched recursively; hidden skipped)."""
    if not path.exists():
        raise ConfigError(f"data.path {str(path)!r} does not exist; give a text file or a folder of text files")
    if path.is_file():
        return [path]
    files = [
        p for p in sorted(path.rglob("*"), key=lambda p: p.relative_to(path).as_posix())
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
    ]
    texts = [p for p in files if _looks_like_text(p)]
    if not texts:
        raise ConfigError(
            f"data.path folder {str(path)!r} contains no text files "
            f"({len(files)} file(s) found, none readable as text); put .txt/.md/source files in it"
        )
    return texts


def user_documents(path: Path, max_bytes: int | None) -> Iterator[Document]:
    total = 0
    for file in user_files(path):
        if max_bytes is not None and total >= max_bytes:
            return
        data = file.read_bytes()
        total += len(data)
        name = file.name if path.is_file() else file.relative_to(path).as_posix()
        yield Document(name, data)
