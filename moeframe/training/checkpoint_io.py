"""Checkpoint IO: atomic, verifiable checkpoint files and folders, and finding an intact one.

The one module the CLI, the LightningModules, the ``Reliability`` callback and the parallel
plugin (through ``moeframe.plugin``) use to write, check and pick checkpoints.

- **Atomic writes.** ``AtomicCheckpointIO`` (a Lightning ``CheckpointIO``) serialises in memory,
  writes to a hidden temporary name (``partial_name``), fsyncs, then renames over the target. The
  previous file stays in place until the new one is complete, so a kill at any moment leaves
  either the old or the new checkpoint, never a torn one. Strategies that write a folder of shards
  (DeepSpeed, FSDP2) write a temporary folder that ``replace_folder`` swaps in;
  ``save_checkpoint_atomically`` picks the right way for the trainer's strategy.
- **Verification.** ``verify_checkpoint`` checks the archive's own CRC32 of every entry (a copy
  without any sidecar is checked too), or the SHA-256 in the hidden ``.sha256/`` folder when that
  record describes this very file. On load, a corrupt file is an error or (``on_corrupt="previous"``)
  the newest intact checkpoint beside it (``newest_other_checkpoint``) is used, with a warning.
- **Finding one.** ``find_resumable_checkpoint`` returns the newest intact checkpoint under a folder.
- **Leftovers.** The hidden partials that killed saves leave are removed by a later run once their
  writer is gone (``remove_stale_partials``); a folder swap cut short is completed.
- **A full disk** ends the save with one line naming an intact checkpoint (beside it, the one the
  run resumed from, or any under the run's root); nothing is overwritten.
- ``state_dict_differences``: one line naming the tensors a checkpoint lacks, has extra, or has
  in another shape.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import logging
import os
import re
import shutil
import socket
import struct
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO, Literal, NamedTuple

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_warn

from moeframe.errors import CheckpointError, TrainingFault

__all__ = [
    "AtomicCheckpointIO",
    "find_resumable_checkpoint",
    "newest_other_checkpoint",
    "partial_name",
    "remove_stale_partials",
    "replace_folder",
    "save_checkpoint_atomically",
    "state_dict_differences",
    "verify_checkpoint",
    "writes_folders",
]

log = logging.getLogger(__name__)

_SIDECAR = ".sha256"
_DISK_FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


# -- atomic, verifiable checkpoint files ------------------------------------------------------------
# Integrity rests on the archive itself: torch.save writes a zip whose central directory holds a
# CRC32 of every entry, and torch's own reader never checks them. verify_checkpoint checks them
# all in one streaming read, so a copy without its sidecar is checked as well as the original. The
# SHA-256 sidecar is a whole-file digest, trusted only for the exact file it was written with
# (same size and modification time to the nanosecond; a rename keeps both), where it replaces the
# CRC32s (a match means the very bytes torch wrote). A sidecar that describes some other file (left
# from an interrupted save, copied beside another file) is ignored, never taken for damage.
_BLOCK = 1 << 24  # bytes per read of the streaming check
_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, 22 bytes we skip, name length, extra length
_MAX_HEX_NAME = 200  # a partial's name holds its target's name in hex up to this length (255 max)
_CLOCK_SLACK_S = 2.0  # /proc's boot time is whole seconds
_SWEEP_DEPTH = 3  # default_root_dir/logs/version_N/checkpoints
_PARTIAL_NAME = re.compile(
    r"\.partial-(?P<pid>\d+)-(?:h(?P<host>[0-9a-f]{8})-)?"
    r"(?P<tag>n[0-9a-f]+|s[0-9a-f]{8}|[0-9a-f]{8})(?P<old>\.old)?"
)
_verified: set[tuple[str, int, int, int, int]] = set()  # files found intact by this process (path + stat)
_NOT_AN_ARCHIVE = "it is not a complete torch checkpoint (truncated or corrupted)"


class _Entry(NamedTuple):
    """Where one archive entry's bytes lie and the CRC32 the archive stores for them."""

    name: str
    start: int
    end: int
    crc: int


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on a directory; the rename is still atomic
    finally:
        os.close(fd)


def _write_durably(path: Path, data: memoryview | bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _rename_into_place(tmp: Path, path: Path) -> None:
    """The commit point of a save: before it, ``path`` still holds the previous checkpoint."""
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _sidecar(path: Path) -> Path:
    # in a hidden folder: Lightning numbers SLURM checkpoints by the digits of every file name in
    # default_root_dir that contains "ckpt_", so nothing beside them may carry that pattern
    return path.parent / _SIDECAR / f"{path.name}.json"


def _host_tag() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def partial_name(path: Path, suffix: str = "") -> Path:
    """A hidden temporary name in the same folder (the rename stays atomic) without "ckpt_": the
    writer's pid and host, so a later run tells a dead writer's leftovers from a live save, and the
    target's name in hex, so a folder swap cut short can be completed."""
    name = path.name.encode().hex()
    tag = f"n{name}" if len(name) <= _MAX_HEX_NAME else "s" + hashlib.sha256(path.name.encode()).hexdigest()[:8]
    return path.parent / f".partial-{os.getpid()}-h{_host_tag()}-{tag}{suffix}"


def _sidecar_entries(path: Path) -> list[dict[str, Any]]:
    """The sidecar entries that describe the file now at ``path`` (same size and mtime), if any."""
    try:
        st = path.stat()
        record = json.loads(_sidecar(path).read_text())
        return [e for e in record["files"] if e["bytes"] == st.st_size and e["mtime_ns"] == st.st_mtime_ns][:1]
    except (OSError, ValueError, KeyError, TypeError):
        return []  # no sidecar, or one from before sidecars named their file: the CRC32s decide


def _write_sidecar(tmp: Path, entries: list[dict[str, Any]]) -> None:
    # "sha256" and "bytes" as earlier releases wrote them, so they still read the new sidecars
    record = {"files": entries, "sha256": [e["sha256"] for e in entries], "bytes": entries[0]["bytes"]}
    _write_durably(tmp, json.dumps(record).encode())


class _CompressedArchive(Exception):
    """An archive repacked with compressed entries (torch.save never writes them): checked by
    inflating each entry instead of reading the stored bytes (``_compressed_archive_problem``)."""


def _archive_entries(f: BinaryIO) -> list[_Entry]:
    """Every entry's byte range, from the central directory and each entry's local header (whose
    name and padding lengths say where the data starts). Raises on a damaged directory."""
    entries = []
    for info in zipfile.ZipFile(f).infolist():
        if info.compress_type != zipfile.ZIP_STORED:
            raise _CompressedArchive(info.filename)
        f.seek(info.header_offset)
        signature, name_len, extra_len = _LOCAL_HEADER.unpack(f.read(_LOCAL_HEADER.size))
        if signature != b"PK\x03\x04":
            raise zipfile.BadZipFile(f"no local header for entry {info.filename}")
        start = info.header_offset + _LOCAL_HEADER.size + name_len + extra_len
        entries.append(_Entry(info.filename, start, start + info.compress_size, info.CRC))
    # torch.save(..., compute_crc32=False) stores 0 for every CRC: nothing to check then
    return sorted(entries, key=lambda e: e.start) if any(e.crc for e in entries) else []


def _stream_check(f: BinaryIO, entries: list[_Entry], sha256: bool) -> tuple[str | None, str | None]:
    """One sequential read of the whole file: (the first entry whose CRC32 differs from the one
    stored, the file's SHA-256 when asked for)."""
    if not entries and not sha256:
        return None, None  # an archive written without CRC32s and no sidecar: nothing to compare
    digest = hashlib.sha256() if sha256 else None
    crcs = [0] * len(entries)
    buffer = bytearray(_BLOCK)
    view = memoryview(buffer)
    f.seek(0)
    pos, first = 0, 0  # entries before `first` are read completely
    while n := f.readinto(buffer):
        end = pos + n
        if digest is not None:
            digest.update(view[:n])
        i = first
        while i < len(entries) and entries[i].start < end:
            lo, hi = max(entries[i].start, pos), min(entries[i].end, end)
            if lo < hi:
                crcs[i] = zlib.crc32(view[lo - pos : hi - pos], crcs[i])
            i += 1
        while first < len(entries) and entries[first].end <= end:
            first += 1
        pos = end
    bad = next((e.name for e, crc in zip(entries, crcs) if crc != e.crc), None)
    return bad, digest.hexdigest() if digest is not None else None


def _compressed_archive_problem(path: Path) -> str | None:
    # an archive repacked with compression: zipfile inflates and checks every entry
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, zlib.error, struct.error, ValueError, EOFError, OSError):
        return _NOT_AN_ARCHIVE
    return None if bad is None else f"its entry {bad!r} does not match the CRC32 stored with it (corrupted)"


def _file_problem(path: Path) -> str | None:
    """Why the checkpoint file ``path`` is damaged, or None: every entry's CRC32, or, when a sidecar
    describes this very file, its SHA-256, in one streaming read (cached per file state)."""
    st = path.stat()
    key = (str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if key in _verified:
        return None
    expected = [e["sha256"] for e in _sidecar_entries(path)]
    try:
        with open(path, "rb", buffering=0) as f:
            # bytes that match the SHA-256 taken when they were written are the bytes torch wrote,
            # CRC32s included: with a sidecar for this file the digest alone decides (one hash, not two)
            bad, sha = _stream_check(f, [] if expected else _archive_entries(f), sha256=bool(expected))
    except _CompressedArchive:
        return _compressed_archive_problem(path)
    except (zipfile.BadZipFile, struct.error, ValueError, EOFError, OSError):
        return _NOT_AN_ARCHIVE
    if bad is not None:
        return f"its entry {bad!r} does not match the CRC32 stored with it (corrupted)"
    if expected and sha != expected[0]:
        return "its content does not match the SHA-256 written with it (truncated or corrupted)"
    _verified.add(key)
    return None


def newest_other_checkpoint(path: Path) -> Path | None:
    """The newest intact checkpoint beside ``path`` (same folder), ``path`` excluded."""
    folder = path.parent
    if not folder.is_dir():
        return None
    candidates = [
        p
        for p in folder.iterdir()
        if p.name.endswith(".ckpt") and not p.name.startswith(".") and p.resolve() != path.resolve()
    ]
    for candidate in sorted(candidates, key=lambda p: p.stat().st_mtime, reverse=True):
        if verify_checkpoint(candidate) is None:
            return candidate
    return None


def verify_checkpoint(path: Path) -> str | None:
    """None when ``path`` is intact, else why not. A file must be a complete zip archive (what
    ``torch.save`` writes) whose every entry matches its stored CRC32, or, when its sidecar
    describes this very file, match the SHA-256 written with it. A DeepSpeed checkpoint folder must
    hold its ``latest`` tag and the files it names, each passing the same check; a
    torch.distributed.checkpoint folder (FSDP2 / ModelParallelStrategy) its ``.metadata``, which
    is written last, after every rank's shard."""
    path = Path(path)
    if path.is_dir():
        return _folder_problem(path)
    if not path.is_file():
        return "it does not exist"
    return _file_problem(path)


def _folder_problem(path: Path) -> str | None:
    if (path / ".metadata").is_file() or list(path.glob("*.distcp")):
        return (
            None
            if (path / ".metadata").is_file()
            else "a torch.distributed.checkpoint folder without its '.metadata' file (the save did not finish)"
        )
    tag_file = path / "latest"
    if not tag_file.is_file():
        return "a DeepSpeed checkpoint folder without its 'latest' file"
    tag = tag_file.read_text().strip()
    if not list((path / tag).glob("*model_states.pt")):
        return f"the DeepSpeed checkpoint folder lacks {tag}/*model_states.pt"
    for part in sorted((path / tag).glob("*.pt")):
        problem = _file_problem(part)
        if problem is not None:
            return f"{part.relative_to(path)}: {problem}"
    return None


# -- leftovers of saves that were killed --------------------------------------------------------------
def _process_start(pid: int) -> float | None:
    """When process ``pid`` of this host started (epoch seconds); None when there is no such
    process (or only its zombie); -inf when it is alive but its start is unknown (no /proc)."""
    if pid <= 0:
        return float("-inf")
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass  # alive, another user's
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        if fields[0] in ("Z", "X"):
            return None  # a zombie writes nothing
        boot = next(
            float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines() if line.startswith("btime ")
        )
        return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22: start time in clock ticks
    except (OSError, ValueError, IndexError, StopIteration):
        return float("-inf")


def _writer_gone(partial: Path, match: re.Match[str]) -> bool:
    """The process that wrote ``partial`` is gone: not alive on this host, or its pid now belongs to
    a process that started after the partial was last written (a restarted container reuses pids).
    A partial written on another host is never judged from here."""
    if match["host"] is not None and match["host"] != _host_tag():
        return False
    started = _process_start(int(match["pid"]))
    return started is None or partial.lstat().st_mtime < started - _CLOCK_SLACK_S


def _partial_target(partial: Path, match: re.Match[str]) -> Path | None:
    """The checkpoint a partial was written for, when its name tells (or a file beside matches its hash)."""
    tag = match["tag"]
    if tag.startswith("n"):
        try:
            name = bytes.fromhex(tag[1:]).decode()
        except ValueError:
            return None
        return partial.parent / name if name not in ("", ".", "..") and "/" not in name else None
    digest = tag.lstrip("s")
    return next(
        (
            p
            for p in partial.parent.iterdir()
            if not p.name.startswith(".") and hashlib.sha256(p.name.encode()).hexdigest()[:8] == digest
        ),
        None,
    )


def _finish_folder_swap(old: Path, match: re.Match[str]) -> bool:
    """A stale ``.old`` folder is the previous checkpoint moved aside by ``replace_folder``. When the
    swap was cut short (the target missing) put the new folder in place if it is complete, else the
    old one back. True when ``old`` is no longer needed."""
    target = _partial_target(old, match)
    if target is None:
        rank_zero_warn(f"left {old} alone: it may hold the only copy of a checkpoint whose name it does not tell")
        return False
    if target.exists():
        return True  # the swap finished; only the removal of the old copy was cut short
    new = old.with_name(old.name[: -len(".old")])
    if new.exists() and verify_checkpoint(new) is None:
        os.replace(new, target)
        _fsync_dir(target.parent)
        return True
    os.replace(old, target)
    _fsync_dir(target.parent)
    return False


def _partials_under(root: Path, max_depth: int | None) -> list[Path]:
    """``.partial-*`` names in ``root``, its sidecar folder and the folders below it that are not
    hidden (nor partials themselves), down to ``max_depth`` levels (None: all)."""
    found = []
    for folder, dirs, files in os.walk(root):
        found += [Path(folder) / n for n in (*dirs, *files) if n.startswith(".partial-")]
        deeper = max_depth is None or len(Path(folder).relative_to(root).parts) < max_depth
        dirs[:] = [d for d in dirs if d == _SIDECAR or (deeper and not d.startswith("."))]
    return found


def remove_stale_partials(root: Path, max_depth: int | None = None) -> list[Path]:
    """Remove what saves killed half way left under ``root`` (down to ``max_depth`` folder levels;
    0: ``root`` alone): hidden ``.partial-*`` files and folders, each a whole checkpoint's size,
    whose writer is gone (see ``_writer_gone``). A live save of another process, and partials
    written on another host, stay. A folder swap cut short is completed first, so no checkpoint is
    lost. Returns what was removed."""
    root = Path(root)
    if not root.is_dir():
        return []
    # ".old" folders first: finishing their swap may move the new folder into place
    found = sorted(_partials_under(root, max_depth), key=lambda p: not p.name.endswith(".old"))
    return [partial for partial in found if _remove_if_stale(partial)]


def _remove_if_stale(partial: Path) -> bool:
    match = _PARTIAL_NAME.fullmatch(partial.name)
    try:
        if match is None or not os.path.lexists(partial) or not _writer_gone(partial, match):
            return False
        if match["old"] and not _finish_folder_swap(partial, match):
            return False
        shutil.rmtree(partial) if partial.is_dir() and not partial.is_symlink() else partial.unlink()
        return True
    except OSError as exc:  # tidying up must never stop a run
        log.warning(f"could not remove {partial}: {_first_line(exc)}")
        return False


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's TorchCheckpointIO, written atomically and verifiably (see the module docstring).

    Args:
        on_corrupt: what ``load_checkpoint`` does with a corrupt file: ``error`` (one clear line) or
            ``previous`` (warn and load the newest intact checkpoint in the same folder).

    ``resumed_from`` and ``run_root`` (set by the Reliability callback) tell a full disk where the
    intact checkpoints of this run lie beyond the folder being written.
    """

    def __init__(self, on_corrupt: Literal["error", "previous"] = "error") -> None:
        super().__init__()
        self.on_corrupt = on_corrupt
        self.last_saved: Path | None = None
        self.resumed_from: Path | None = None
        self.run_root: Path | None = None
        self._swept: set[Path] = set()

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO takes no storage_options")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._sweep(path.parent)
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        data = buffer.getbuffer()
        tmp, tmp_sidecar = partial_name(path), partial_name(_sidecar(path))
        try:
            _write_durably(tmp, data)
            written = tmp.stat()
            entry = {
                "sha256": hashlib.sha256(data).hexdigest(),
                "bytes": written.st_size,
                "mtime_ns": written.st_mtime_ns,
            }
            tmp_sidecar.parent.mkdir(exist_ok=True)
            # the sidecar goes first and keeps the entry of the file still at the path (matched by
            # size and mtime, never a digest taken on trust), so a kill between the two renames,
            # however often it happens, leaves a file that its sidecar describes truly
            _write_sidecar(tmp_sidecar, [entry, *_sidecar_entries(path)])
            os.replace(tmp_sidecar, _sidecar(path))
            _rename_into_place(tmp, path)
        except OSError as exc:
            for leftover in (tmp, tmp_sidecar):
                leftover.unlink(missing_ok=True)
            raise _save_error(path, exc, self.resumed_from, self.run_root) from exc
        self.last_saved = path

    def _sweep(self, folder: Path) -> None:
        """Once per folder: remove the partials of saves that were killed (they are full size)."""
        if folder not in self._swept:
            self._swept.add(folder)
            remove_stale_partials(folder, max_depth=0)

    def load_checkpoint(
        self, path: Any, map_location: Callable | None = lambda storage, loc: storage, weights_only: bool | None = None
    ) -> dict[str, Any]:
        path = Path(path)
        problem = verify_checkpoint(path)
        if problem is not None and path.exists():
            if self.on_corrupt == "previous":
                fallback = newest_other_checkpoint(path)
                if fallback is not None:
                    rank_zero_warn(f"checkpoint {path} is unusable: {problem}; resuming from {fallback} instead")
                    return super().load_checkpoint(fallback, map_location=map_location, weights_only=weights_only)
            fallback = newest_other_checkpoint(path)
            hint = f"; the newest intact one beside it is {fallback}" if fallback else ""
            raise CheckpointError(f"checkpoint {path} is unusable: {problem}{hint}")
        try:
            return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        except (RuntimeError, EOFError, OSError, ValueError) as exc:
            if isinstance(exc, FileNotFoundError):
                raise
            raise CheckpointError(
                f"checkpoint {path} cannot be read ({_first_line(exc)}); it is truncated or "
                "corrupted: resume from an earlier checkpoint"
            ) from exc

    def remove_checkpoint(self, path: Any) -> None:
        super().remove_checkpoint(path)
        _sidecar(Path(path)).unlink(missing_ok=True)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _intact_elsewhere(path: Path, resumed_from: Path | None, run_root: Path | None) -> Path | None:
    """The checkpoint a run that cannot save ``path`` still has: ``path`` itself, the newest intact
    one beside it, the one the run resumed from (often another logger version's folder), or the
    newest intact one anywhere under the run's root."""
    if path.exists() and verify_checkpoint(path) is None:
        return path
    beside = newest_other_checkpoint(path)
    if beside is not None:
        return beside
    if resumed_from is not None and resumed_from.exists() and verify_checkpoint(resumed_from) is None:
        return resumed_from
    found = find_resumable_checkpoint(run_root) if run_root is not None else None
    return found if found is not None and found.resolve() != path.resolve() else None


def _save_error(path: Path, exc: OSError, resumed_from: Path | None = None, run_root: Path | None = None) -> Exception:
    if exc.errno not in _DISK_FULL:
        return TrainingFault(f"could not write checkpoint {path}: {_first_line(exc)}")
    previous = _intact_elsewhere(path, resumed_from, run_root)
    origin = " (the one this run resumed from)" if previous is not None and previous == resumed_from else ""
    kept = f"the previous checkpoint {previous}{origin} is intact" if previous else "no earlier checkpoint exists"
    return TrainingFault(
        f"disk full while saving checkpoint {path} ({os.strerror(exc.errno)}); nothing was "
        f"overwritten and {kept}: free space (or point default_root_dir elsewhere) and resume"
    )


def replace_folder(tmp: Path, path: Path) -> None:
    """Put a finished checkpoint folder in place; the old one is removed only afterwards."""
    old = partial_name(path, ".old")
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    shutil.rmtree(old, ignore_errors=True)


def save_checkpoint_atomically(trainer: L.Trainer, path: Path) -> Path:
    """``trainer.save_checkpoint`` that never leaves a torn ``path``. Single files go through
    AtomicCheckpointIO; a strategy that writes a folder (DeepSpeed) writes a temporary folder
    that rank 0 renames once every rank has written its part."""
    if isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO) and not writes_folders(trainer):
        trainer.save_checkpoint(path)
        return path
    tmp = Path(trainer.strategy.broadcast(str(partial_name(path))))
    trainer.save_checkpoint(tmp)
    trainer.strategy.barrier("moeframe-atomic-save")
    if trainer.is_global_zero:
        replace_folder(tmp, path) if tmp.is_dir() else (os.replace(tmp, path), _fsync_dir(path.parent))
    trainer.strategy.barrier("moeframe-atomic-save-done")
    return path


def writes_folders(trainer: L.Trainer) -> bool:
    """Strategies that write checkpoints themselves (folders of shards), not through CheckpointIO."""
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy

    return isinstance(trainer.strategy, (DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy))


def find_resumable_checkpoint(root: Path) -> Path | None:
    """The checkpoint a restarted run should resume from: the newest intact ``*.ckpt`` (file or
    DeepSpeed folder) under ``root`` by modification time; a corrupt newer one is passed over."""
    root = Path(root)
    if not root.is_dir():
        return None
    candidates = [
        p for p in root.rglob("*.ckpt") if not any(part.startswith(".") for part in p.relative_to(root).parts)
    ]
    candidates = [p for p in candidates if p.is_file() or (p / "latest").is_file()]
    for candidate in sorted(candidates, key=lambda p: p.stat().st_mtime, reverse=True):
        problem = verify_checkpoint(candidate)
        if problem is None:
            return candidate
        rank_zero_warn(f"skipping checkpoint {candidate}: {problem}")
    return None


# -- which tensors differ between a model and a checkpoint ------------------------------------------
def state_dict_differences(
    model_state: dict[str, torch.Tensor], ckpt_state: dict[str, Any], limit: int = 4, names: bool = True
) -> str:
    """One line naming the tensors that a checkpoint lacks, has extra, or has in another shape;
    empty when they match. ``names=False``: shapes only (what a non-strict ``load_state_dict`` checks)."""
    missing = [k for k in model_state if k not in ckpt_state] if names else []
    extra = [k for k in ckpt_state if k not in model_state] if names else []
    shapes = [
        f"{k} {tuple(ckpt_state[k].shape)} vs {tuple(v.shape)}"
        for k, v in model_state.items()
        if k in ckpt_state and isinstance(ckpt_state[k], torch.Tensor) and tuple(ckpt_state[k].shape) != tuple(v.shape)
    ]
    parts = []
    for label, items in (
        ("shape differs (checkpoint vs model)", shapes),
        ("missing from the checkpoint", missing),
        ("not in the model", extra),
    ):
        if items:
            more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
            parts.append(f"{label}: {', '.join(items[:limit])}{more}")
    return "; ".join(parts)
