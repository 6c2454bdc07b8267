"""Reliability for long runs: exact resume, preemption, numerical and router faults, safe checkpoints.

``Reliability`` is a Lightning callback that ``PretrainModule`` adds to every fit (like
``ExpertBalance``); put it in a run config's ``trainer.callbacks`` to change its options.

What it does, per optimizer step, with ONE all-reduce of a small float64 vector (the per-rank
flags, the step's loss sum and the step's expert counts), so every rank takes the same decision:

- **Preemption.** SIGTERM and SIGUSR1 only set a flag (a signal handler never runs a collective or
  writes a file). At the next step boundary the ranks agree that one of them was signalled, save a
  checkpoint (``last.ckpt`` in the ModelCheckpoint folder; under SLURM auto-requeue, SIGUSR1 saves
  Lightning's ``hpc_ckpt_N.ckpt`` and requeues the job through Lightning's own handler) and leave
  through Lightning's ``SIGTERMException``: a clean exit, status 0, nothing half written.
- **Non-finite loss or gradient.** Policy ``skip``: the step's gradients are dropped (AdamW then
  leaves weights and moments untouched), the step is counted (``reliability/skipped_steps``) and
  training goes on; ``max_consecutive_nonfinite`` skipped steps in a row stop the run. Policy
  ``stop``: the first one stops it. Before stopping, the batch is run forward once more with
  forward hooks on every module (armed only for this diagnosis) to name the first module whose
  output became non-finite; the error names the step, that module and the last good checkpoint.
  Under DeepSpeed the engine steps by itself, so a non-finite loss always stops the run.
- **Loss spikes.** A step loss above ``loss_spike_factor`` × the mean of the previous
  ``loss_spike_window`` step losses is an event.
- **Router faults.** An expert with no token for ``collapse_patience`` steps in a row, or a layer
  whose MaxVio (arXiv 2408.15664) stays above ``maxvio_threshold`` for ``maxvio_patience`` steps,
  is an event naming the layer and the expert.
- **RNG states of every rank** (torch, CUDA, numpy, Python) travel in the checkpoint and are put
  back right before the first training batch after a resume, where the uninterrupted run stood.

Events go to ``<log dir>/events.jsonl`` (one JSON object per line) and to the trainer's loggers
under ``reliability/...``.

Checkpoint files are written by ``AtomicCheckpointIO`` (installed by the callback when the
strategy uses Lightning's default CheckpointIO): serialised in memory, written to a hidden
temporary name, fsync'ed, then renamed over the target. The previous file stays in place until the
new one is complete, so a kill at any moment leaves either the old or the new checkpoint, never a
torn one; the hidden partials such kills leave are removed by a later run once their writer is
gone. Every load checks the archive's own CRC32 of every entry (a copy without any sidecar is
checked too), or the SHA-256 in the hidden ``.sha256/`` folder when that record describes this
very file. A full disk ends the run with one line naming an intact checkpoint (beside it, the one
the run resumed from, or any under ``default_root_dir``). On load, a corrupt file is an error or
(``on_corrupt_checkpoint: previous``) the newest intact checkpoint beside it is used instead,
with a warning.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import logging
import os
import random
import re
import shutil
import signal
import socket
import struct
import threading
import time
import zipfile
import zlib
from collections import deque
from pathlib import Path
from typing import Any, BinaryIO, Callable, Literal, NamedTuple, Optional

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch import nn

from moeframe.errors import CheckpointError, TrainingFault
from moeframe.training.balance import counts_by_layer_id, local_rows, max_violation, moe_layers
from moeframe.training.callbacks import log_dir

__all__ = ["AtomicCheckpointIO", "NonFiniteError", "Reliability", "find_resumable_checkpoint", "first_nonfinite_module",
           "remove_stale_partials", "state_dict_differences", "verify_checkpoint"]

log = logging.getLogger(__name__)

EVENTS_FILE = "events.jsonl"
_SIDECAR = ".sha256"
_DISK_FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


class NonFiniteError(TrainingFault):
    """Training stopped on non-finite losses or gradients."""


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
_PARTIAL_NAME = re.compile(r"\.partial-(?P<pid>\d+)-(?:h(?P<host>[0-9a-f]{8})-)?"
                           r"(?P<tag>n[0-9a-f]+|s[0-9a-f]{8}|[0-9a-f]{8})(?P<old>\.old)?")
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


def _sidecar(path: Path) -> Path:
    # in a hidden folder: Lightning numbers SLURM checkpoints by the digits of every file name in
    # default_root_dir that contains "ckpt_", so nothing beside them may carry that pattern
    return path.parent / _SIDECAR / f"{path.name}.json"


def _host_tag() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def _partial(path: Path, suffix: str = "") -> Path:
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


def _stream_check(f: BinaryIO, entries: list[_Entry], sha256: bool) -> tuple[Optional[str], Optional[str]]:
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
                crcs[i] = zlib.crc32(view[lo - pos:hi - pos], crcs[i])
            i += 1
        while first < len(entries) and entries[first].end <= end:
            first += 1
        pos = end
    bad = next((e.name for e, crc in zip(entries, crcs) if crc != e.crc), None)
    return bad, digest.hexdigest() if digest is not None else None


def _compressed_archive_problem(path: Path) -> Optional[str]:
    # an archive repacked with compression: zipfile inflates and checks every entry
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, zlib.error, struct.error, ValueError, EOFError, OSError):
        return _NOT_AN_ARCHIVE
    return None if bad is None else f"its entry {bad!r} does not match the CRC32 stored with it (corrupted)"


def _file_problem(path: Path) -> Optional[str]:
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


def newest_other_checkpoint(path: Path) -> Optional[Path]:
    """The newest intact checkpoint beside ``path`` (same folder), ``path`` excluded."""
    folder = path.parent
    if not folder.is_dir():
        return None
    candidates = [p for p in folder.iterdir() if p.name.endswith(".ckpt") and not p.name.startswith(".")
                  and p.resolve() != path.resolve()]
    for candidate in sorted(candidates, key=lambda p: p.stat().st_mtime, reverse=True):
        if verify_checkpoint(candidate) is None:
            return candidate
    return None


def verify_checkpoint(path: Path) -> Optional[str]:
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


def _folder_problem(path: Path) -> Optional[str]:
    if (path / ".metadata").is_file() or list(path.glob("*.distcp")):
        return None if (path / ".metadata").is_file() else \
            "a torch.distributed.checkpoint folder without its '.metadata' file (the save did not finish)"
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
def _process_start(pid: int) -> Optional[float]:
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
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
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


def _partial_target(partial: Path, match: re.Match[str]) -> Optional[Path]:
    """The checkpoint a partial was written for, when its name tells (or a file beside matches its hash)."""
    tag = match["tag"]
    if tag.startswith("n"):
        try:
            name = bytes.fromhex(tag[1:]).decode()
        except ValueError:
            return None
        return partial.parent / name if name not in ("", ".", "..") and "/" not in name else None
    digest = tag.lstrip("s")
    return next((p for p in partial.parent.iterdir() if not p.name.startswith(".")
                 and hashlib.sha256(p.name.encode()).hexdigest()[:8] == digest), None)


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
    new = old.with_name(old.name[:-len(".old")])
    if new.exists() and verify_checkpoint(new) is None:
        os.replace(new, target)
        _fsync_dir(target.parent)
        return True
    os.replace(old, target)
    _fsync_dir(target.parent)
    return False


def _partials_under(root: Path, max_depth: Optional[int]) -> list[Path]:
    """``.partial-*`` names in ``root``, its sidecar folder and the folders below it that are not
    hidden (nor partials themselves), down to ``max_depth`` levels (None: all)."""
    found = []
    for folder, dirs, files in os.walk(root):
        found += [Path(folder) / n for n in (*dirs, *files) if n.startswith(".partial-")]
        deeper = max_depth is None or len(Path(folder).relative_to(root).parts) < max_depth
        dirs[:] = [d for d in dirs if d == _SIDECAR or (deeper and not d.startswith("."))]
    return found


def remove_stale_partials(root: Path, max_depth: Optional[int] = None) -> list[Path]:
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
        self.last_saved: Optional[Path] = None
        self.resumed_from: Optional[Path] = None
        self.run_root: Optional[Path] = None
        self._swept: set[Path] = set()

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO takes no storage_options")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._sweep(path.parent)
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        data = buffer.getbuffer()
        tmp, tmp_sidecar = _partial(path), _partial(_sidecar(path))
        try:
            _write_durably(tmp, data)
            written = tmp.stat()
            entry = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": written.st_size, "mtime_ns": written.st_mtime_ns}
            tmp_sidecar.parent.mkdir(exist_ok=True)
            # the sidecar goes first and keeps the entry of the file still at the path (matched by
            # size and mtime, never a digest taken on trust), so a kill between the two renames,
            # however often it happens, leaves a file that its sidecar describes truly
            _write_sidecar(tmp_sidecar, [entry, *_sidecar_entries(path)])
            os.replace(tmp_sidecar, _sidecar(path))
            _slow_save_for_tests()
            os.replace(tmp, path)
            _fsync_dir(path.parent)
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

    def load_checkpoint(self, path: Any, map_location: Optional[Callable] = lambda storage, loc: storage,
                        weights_only: Optional[bool] = None) -> dict[str, Any]:
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
            raise CheckpointError(f"checkpoint {path} cannot be read ({_first_line(exc)}); it is truncated or "
                                  "corrupted: resume from an earlier checkpoint") from exc

    def remove_checkpoint(self, path: Any) -> None:
        super().remove_checkpoint(path)
        _sidecar(Path(path)).unlink(missing_ok=True)


def _slow_save_for_tests() -> None:
    """Tests make the window between writing and renaming long enough to kill a process in it."""
    delay = float(os.environ.get("MOEFRAME_TEST_SLOW_SAVE_S", "0") or 0)
    if delay:
        marker = os.environ.get("MOEFRAME_TEST_SLOW_SAVE_MARKER")
        if marker:
            Path(marker).write_text("saving")
        time.sleep(delay)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _intact_elsewhere(path: Path, resumed_from: Optional[Path], run_root: Optional[Path]) -> Optional[Path]:
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


def _save_error(path: Path, exc: OSError, resumed_from: Optional[Path] = None,
                run_root: Optional[Path] = None) -> Exception:
    if exc.errno not in _DISK_FULL:
        return TrainingFault(f"could not write checkpoint {path}: {_first_line(exc)}")
    previous = _intact_elsewhere(path, resumed_from, run_root)
    origin = " (the one this run resumed from)" if previous is not None and previous == resumed_from else ""
    kept = f"the previous checkpoint {previous}{origin} is intact" if previous else "no earlier checkpoint exists"
    return TrainingFault(f"disk full while saving checkpoint {path} ({os.strerror(exc.errno)}); nothing was "
                         f"overwritten and {kept}: free space (or point default_root_dir elsewhere) and resume")


def _replace_folder(tmp: Path, path: Path) -> None:
    """Put a finished checkpoint folder in place; the old one is removed only afterwards."""
    old = _partial(path, ".old")
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    shutil.rmtree(old, ignore_errors=True)


# the names strategies that write folders use for their own atomic saves
partial_name = _partial
replace_folder = _replace_folder


def save_checkpoint_atomically(trainer: L.Trainer, path: Path) -> Path:
    """``trainer.save_checkpoint`` that never leaves a torn ``path``. Single files go through
    AtomicCheckpointIO; a strategy that writes a folder (DeepSpeed) writes a temporary folder
    that rank 0 renames once every rank has written its part."""
    if isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO) and not _writes_folders(trainer):
        trainer.save_checkpoint(path)
        return path
    tmp = Path(trainer.strategy.broadcast(str(_partial(path))))
    trainer.save_checkpoint(tmp)
    trainer.strategy.barrier("moeframe-atomic-save")
    if trainer.is_global_zero:
        _replace_folder(tmp, path) if tmp.is_dir() else (os.replace(tmp, path), _fsync_dir(path.parent))
    trainer.strategy.barrier("moeframe-atomic-save-done")
    return path


def _writes_folders(trainer: L.Trainer) -> bool:
    """Strategies that write checkpoints themselves (folders of shards), not through CheckpointIO."""
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy

    return isinstance(trainer.strategy, (DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy))


def _steps_by_itself(trainer: L.Trainer) -> bool:
    """DeepSpeed's engine steps its optimizer itself: a step cannot be skipped from a callback."""
    from lightning.pytorch.strategies import DeepSpeedStrategy

    return isinstance(trainer.strategy, DeepSpeedStrategy)


def find_resumable_checkpoint(root: Path) -> Optional[Path]:
    """The checkpoint a restarted run should resume from: the newest intact ``*.ckpt`` (file or
    DeepSpeed folder) under ``root`` by modification time; a corrupt newer one is passed over."""
    root = Path(root)
    if not root.is_dir():
        return None
    candidates = [p for p in root.rglob("*.ckpt") if not any(part.startswith(".") for part in p.relative_to(root).parts)]
    candidates = [p for p in candidates if p.is_file() or (p / "latest").is_file()]
    for candidate in sorted(candidates, key=lambda p: p.stat().st_mtime, reverse=True):
        problem = verify_checkpoint(candidate)
        if problem is None:
            return candidate
        rank_zero_warn(f"skipping checkpoint {candidate}: {problem}")
    return None


# -- which tensors differ between a model and a checkpoint ------------------------------------------
def state_dict_differences(model_state: dict[str, torch.Tensor], ckpt_state: dict[str, Any], limit: int = 4) -> str:
    """One line naming the tensors that a checkpoint lacks, has extra, or has in another shape;
    empty when they match."""
    missing = [k for k in model_state if k not in ckpt_state]
    extra = [k for k in ckpt_state if k not in model_state]
    shapes = [f"{k} {tuple(ckpt_state[k].shape)} vs {tuple(v.shape)}" for k, v in model_state.items()
              if k in ckpt_state and isinstance(ckpt_state[k], torch.Tensor) and tuple(ckpt_state[k].shape) != tuple(v.shape)]
    parts = []
    for label, items in (("shape differs (checkpoint vs model)", shapes), ("missing from the checkpoint", missing),
                         ("not in the model", extra)):
        if items:
            more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
            parts.append(f"{label}: {', '.join(items[:limit])}{more}")
    return "; ".join(parts)


# -- finding the first module whose output is non-finite ---------------------------------------------
def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    if hasattr(value, "__dataclass_fields__"):
        return [t for name in value.__dataclass_fields__ for t in _tensors(getattr(value, name))]
    return []


@torch.no_grad()
def first_nonfinite_module(model: nn.Module, run: Callable[[], Any]) -> Optional[str]:
    """Run ``run()`` (a forward through ``model``) with a forward hook on every submodule and
    return the qualified name of the first module, in execution order, whose output holds a NaN
    or an infinity (None if none does). Modules finish before their parents, so this names the
    innermost culprit. Buffers (expert counts) are restored afterwards."""
    found: list[str] = []
    names = {m: n for n, m in model.named_modules() if n}

    def hook(module: nn.Module, _args: Any, output: Any) -> None:
        if not found and any(t.is_floating_point() and not bool(torch.isfinite(t).all()) for t in _tensors(output)):
            found.append(names[module])

    saved = {n: b.detach().clone() for n, b in model.named_buffers()}
    handles = [m.register_forward_hook(hook) for m in names]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
        for n, b in model.named_buffers():
            b.copy_(saved[n])
    return found[0] if found else None


# -- RNG states ---------------------------------------------------------------------------------------
def _rng_state() -> dict[str, Any]:
    # numpy's state as tensors and plain numbers: checkpoints load with torch.load(weights_only=True)
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    numpy_state = {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                   "has_gauss": int(has_gauss), "gauss": float(gauss)}
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "numpy": numpy_state, "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    random.setstate(state["python"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


# -- the callback --------------------------------------------------------------------------------------
_FLAGS = 5  # signal, loss not finite, grads not finite, loss sum, micro-batches


class Reliability(Callback):
    """Preemption, numerical and router faults, RNG states (see the module docstring).

    Args:
        nonfinite: ``skip`` (skip the step and count it) or ``stop`` (stop at the first).
        max_consecutive_nonfinite: with ``skip``, stop after this many skipped steps in a row.
        loss_spike_factor: a step loss above this × the running mean is a ``loss_spike`` event
            (0 disables).
        loss_spike_window: steps in the running mean (events start once it is full).
        collapse_patience: an expert at zero load for this many steps in a row is an
            ``expert_collapse`` event (0 disables).
        maxvio_threshold: a layer with MaxVio above this for ``maxvio_patience`` steps in a row
            is a ``maxvio_high`` event (0 disables).
        maxvio_patience: see ``maxvio_threshold``.
        on_corrupt_checkpoint: when the checkpoint to resume from is corrupt: ``error`` or
            ``previous`` (the newest intact checkpoint in its folder, with a warning).
        handle_signals: take over SIGTERM/SIGUSR1 (checkpoint at the next step, clean exit).
    """

    def __init__(self, nonfinite: Literal["skip", "stop"] = "skip", max_consecutive_nonfinite: int = 5,
                 loss_spike_factor: float = 3.0, loss_spike_window: int = 50, collapse_patience: int = 100,
                 maxvio_threshold: float = 4.0, maxvio_patience: int = 100,
                 on_corrupt_checkpoint: Literal["error", "previous"] = "error", handle_signals: bool = True) -> None:
        if nonfinite not in ("skip", "stop"):
            raise ValueError(f"Reliability: nonfinite must be 'skip' or 'stop', got {nonfinite!r}")
        if on_corrupt_checkpoint not in ("error", "previous"):
            raise ValueError(f"Reliability: on_corrupt_checkpoint must be 'error' or 'previous', got {on_corrupt_checkpoint!r}")
        for name, value in (("max_consecutive_nonfinite", max_consecutive_nonfinite), ("loss_spike_window", loss_spike_window)):
            if value < 1:
                raise ValueError(f"Reliability: {name} must be >= 1, got {value}")
        self.nonfinite, self.max_consecutive_nonfinite = nonfinite, max_consecutive_nonfinite
        self.loss_spike_factor, self.loss_spike_window = loss_spike_factor, loss_spike_window
        self.collapse_patience, self.maxvio_threshold, self.maxvio_patience = collapse_patience, maxvio_threshold, maxvio_patience
        self.on_corrupt_checkpoint, self.handle_signals = on_corrupt_checkpoint, handle_signals
        # state saved in checkpoints
        self.skipped_steps = 0
        self.consecutive_nonfinite = 0
        self.losses: deque[float] = deque(maxlen=loss_spike_window)
        self.zero_load_LE: Optional[torch.Tensor] = None
        self.high_maxvio_L: Optional[torch.Tensor] = None
        self.events: list[dict[str, Any]] = []  # this process's events (also in events.jsonl)
        # per run
        self.signal_received: Optional[int] = None
        self.preempted_to: Optional[Path] = None
        self._pending_rng: Optional[dict[str, Any]] = None
        self._batch: Any = None
        self._loss_sum: Optional[torch.Tensor] = None
        self._loss_bad: Optional[torch.Tensor] = None
        self._micro = 0
        self._layers: list[tuple[str, nn.Module]] = []
        self._agreed: Optional[list[float]] = None
        self._previous_handlers: dict[int, Any] = {}
        self._own_counts = False

    @property
    def state_key(self) -> str:
        return "moeframe.Reliability"  # the same whatever the options, so a resume may change them

    # -- setup ----------------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        io_plugin = trainer.strategy.checkpoint_io
        if type(io_plugin) is TorchCheckpointIO:  # Lightning's default: made atomic
            trainer.strategy.checkpoint_io = AtomicCheckpointIO(self.on_corrupt_checkpoint)
        elif isinstance(io_plugin, AtomicCheckpointIO):
            io_plugin.on_corrupt = self.on_corrupt_checkpoint

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from moeframe.training.balance import ExpertBalance

        self._layers = list(moe_layers(pl_module))
        # ExpertBalance zeroes the expert counts after every step; without it, this callback does
        self._own_counts = not any(isinstance(cb, ExpertBalance) for cb in trainer.callbacks)
        if self._layers:
            L_, E = len(self._layers), int(self._layers[0][1].num_experts)
            if self.zero_load_LE is None or tuple(self.zero_load_LE.shape) != (L_, E):
                self.zero_load_LE = torch.zeros(L_, E, dtype=torch.int64)
                self.high_maxvio_L = torch.zeros(L_, dtype=torch.int64)
        if _steps_by_itself(trainer) and self.nonfinite == "skip":
            rank_zero_info("Reliability: DeepSpeed steps its optimizer itself, so a non-finite loss stops the run "
                           "(the 'skip' policy needs the gradients in the module)")
        if self._own_counts:
            self._zero_counts()  # counts of forwards before training are no step's load
        rank_zero_info(f"moeframe: training from step {trainer.global_step} (max_steps {trainer.max_steps})")
        self._know_checkpoints(trainer)
        if self.handle_signals:
            self._install_signal_handlers(trainer)

    def _know_checkpoints(self, trainer: L.Trainer) -> None:
        """Tell the checkpoint writer where this run's intact checkpoints lie (a full disk names one),
        and remove what saves killed in earlier runs left behind (full-size hidden partials)."""
        resumed = Path(trainer.ckpt_path) if trainer.ckpt_path and Path(trainer.ckpt_path).exists() else None
        io_plugin = trainer.strategy.checkpoint_io
        if isinstance(io_plugin, AtomicCheckpointIO):
            io_plugin.resumed_from, io_plugin.run_root = resumed, Path(trainer.default_root_dir)
        if not trainer.is_global_zero:
            return
        callback = trainer.checkpoint_callback
        # default_root_dir down to <logs>/version_N/checkpoints, not the data that may lie below it
        folders = [(Path(trainer.default_root_dir), _SWEEP_DEPTH)]
        if isinstance(callback, ModelCheckpoint) and callback.dirpath:
            folders.append((Path(callback.dirpath), 0))
        if resumed is not None:
            folders.append((resumed.parent, 0))
        removed = [p for folder, depth in folders for p in remove_stale_partials(folder, depth)]
        if removed:
            rank_zero_info(f"moeframe: removed {len(removed)} partial checkpoint(s) left by saves that were killed: "
                           + ", ".join(str(p) for p in removed[:3]) + (" ..." if len(removed) > 3 else ""))

    # signals: handlers installed after Lightning's (which register when the run starts), so a
    # signal only sets a flag here; Lightning's SIGTERM handler would run a collective inside the
    # handler and stop without a checkpoint
    def _install_signal_handlers(self, trainer: L.Trainer) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        if getattr(trainer, "received_sigterm", False):  # arrived before training started
            self.signal_received = int(signal.SIGTERM)
        for signum in (signal.SIGTERM, signal.SIGUSR1):
            self._previous_handlers[int(signum)] = signal.getsignal(signum)
            signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, _frame: Any) -> None:
        if self.signal_received is None or signum == signal.SIGUSR1:
            self.signal_received = int(signum)
        # stderr, not logging: a handler may interrupt a logging call holding its lock
        os.write(2, f"moeframe: received signal {signum}; a checkpoint follows at the next step boundary\n".encode())

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if threading.current_thread() is threading.main_thread():
            for signum, handler in self._previous_handlers.items():
                if handler is not None:
                    signal.signal(signum, handler)
        self._previous_handlers = {}

    # -- per micro-batch ----------------------------------------------------------------------------
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if self._pending_rng is not None:  # resumed: continue the random streams where they were saved
            _set_rng_state(self._pending_rng)
            self._pending_rng = None
        self._batch = batch

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        loss = loss.detach().float()
        bad = (~torch.isfinite(loss)).double()
        self._loss_bad = bad if self._loss_bad is None else self._loss_bad + bad
        value = torch.nan_to_num(loss.double(), nan=0.0, posinf=0.0, neginf=0.0)
        self._loss_sum = value if self._loss_sum is None else self._loss_sum + value
        self._micro += 1

    # -- once per optimizer step, before the update ----------------------------------------------------
    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        device = pl_module.device
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        grad_bad = torch.zeros((), dtype=torch.float64, device=device)
        if grads:
            norm = torch.nn.utils.get_total_norm(grads)
            if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor over the shards
                norm = norm.full_tensor()
            grad_bad = (~torch.isfinite(norm)).double().to(device)
        zero = torch.zeros((), dtype=torch.float64, device=device)
        flags = torch.stack([torch.tensor(float(self.signal_received is not None), dtype=torch.float64, device=device),
                             (self._loss_bad if self._loss_bad is not None else zero).to(device), grad_bad,
                             (self._loss_sum if self._loss_sum is not None else zero).to(device),
                             torch.tensor(float(self._micro), dtype=torch.float64, device=device)])
        parts = [flags]
        counts = counts_by_layer_id(self._layers, pl_module, device)  # rows line up across pipeline stages
        if counts is not None:  # this step's expert load, summed over the ranks in the same collective
            parts.append(counts.flatten())
        vector = torch.cat(parts)
        if _distributed():
            dist.all_reduce(vector, op=dist.ReduceOp.SUM)
        self._agreed = vector.tolist()
        self._loss_sum, self._loss_bad, self._micro = None, None, 0
        if self._agreed[1] > 0 or self._agreed[2] > 0:
            self._nonfinite_step(trainer, pl_module, loss_bad=self._agreed[1] > 0)
        else:
            self.consecutive_nonfinite = 0

    def _nonfinite_step(self, trainer: L.Trainer, pl_module: L.LightningModule, loss_bad: bool) -> None:
        step = trainer.global_step + 1  # the step being taken
        what = "loss" if loss_bad else "gradient"
        module = self._diagnose(pl_module)
        where = f"first non-finite output: {module}" if module else "no module output was non-finite (the backward pass)"
        self.consecutive_nonfinite += 1
        stop = (self.nonfinite == "stop" or _steps_by_itself(trainer)
                or self.consecutive_nonfinite >= self.max_consecutive_nonfinite)
        self._event(trainer, "nonfinite", step=step, what=what, module=module, consecutive=self.consecutive_nonfinite,
                    action="stop" if stop else "skip")
        if stop:
            raise NonFiniteError(
                f"non-finite {what} at step {step} ({self.consecutive_nonfinite} step(s) in a row; {where}); "
                f"last good checkpoint: {self._last_checkpoint(trainer) or 'none saved yet'}")
        for p in pl_module.parameters():  # AdamW skips parameters without a gradient: no update at all
            p.grad = None
        self.skipped_steps += 1
        self._log(trainer, {"reliability/skipped_steps": float(self.skipped_steps)}, step)
        rank_zero_warn(f"step {step}: non-finite {what} ({where}); step skipped ({self.skipped_steps} so far)")

    def _diagnose(self, pl_module: L.LightningModule) -> Optional[str]:
        batch = self._batch
        if not isinstance(batch, dict) or "input_ids" not in batch:
            return None
        was_training = pl_module.training
        try:
            return first_nonfinite_module(pl_module, lambda: pl_module(batch["input_ids"], batch.get("document_ids")))
        except Exception as exc:  # a diagnosis must never hide the fault it diagnoses
            log.warning(f"could not locate the non-finite module: {exc}")
            return None
        finally:
            pl_module.train(was_training)

    def _last_checkpoint(self, trainer: L.Trainer) -> Optional[str]:
        io_plugin = trainer.strategy.checkpoint_io
        if isinstance(io_plugin, AtomicCheckpointIO) and io_plugin.last_saved is not None:
            return str(io_plugin.last_saved)
        callback = trainer.checkpoint_callback
        if isinstance(callback, ModelCheckpoint) and callback.last_model_path:
            return callback.last_model_path
        if self.preempted_to is not None:
            return str(self.preempted_to)
        return getattr(trainer, "ckpt_path", None)

    # -- once per optimizer step, after the update ------------------------------------------------------
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        agreed, self._agreed = self._agreed, None
        self._batch = None
        if agreed is None:  # inside a gradient-accumulation window
            return
        step = trainer.global_step
        if agreed[1] == 0 and agreed[2] == 0 and agreed[4] > 0:
            self._watch_loss(trainer, agreed[3] / agreed[4], step)
        if self._layers:
            counts_LE = local_rows(torch.tensor(agreed[_FLAGS:], dtype=torch.float64), self._layers, pl_module)
            self._watch_router(trainer, counts_LE, step)
            if self._own_counts:
                self._zero_counts()
        if agreed[0] > 0:
            self._preempt(trainer)

    def _zero_counts(self) -> None:
        for _, m in self._layers:
            m.tokens_per_expert.zero_()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._layers and self._own_counts:
            self._zero_counts()  # validation forwards are no training load

    def _watch_loss(self, trainer: L.Trainer, loss: float, step: int) -> None:
        full = len(self.losses) == self.loss_spike_window
        if self.loss_spike_factor > 0 and full:
            mean = sum(self.losses) / len(self.losses)
            if mean > 0 and loss > self.loss_spike_factor * mean:
                self._event(trainer, "loss_spike", step=step, loss=loss, running_mean=mean, ratio=loss / mean)
                self._log(trainer, {"reliability/loss_spike_ratio": loss / mean}, step)
        self.losses.append(loss)

    def _watch_router(self, trainer: L.Trainer, counts_LE: torch.Tensor, step: int) -> None:
        assert self.zero_load_LE is not None and self.high_maxvio_L is not None
        self.zero_load_LE = torch.where(counts_LE == 0, self.zero_load_LE + 1, 0)
        if self.collapse_patience > 0:
            for layer, expert in (self.zero_load_LE == self.collapse_patience).nonzero().tolist():
                self._event(trainer, "expert_collapse", step=step, layer=self._layers[layer][0], expert=expert,
                            steps_without_tokens=self.collapse_patience)
        maxvio_L = max_violation(counts_LE)
        self.high_maxvio_L = torch.where(maxvio_L > self.maxvio_threshold, self.high_maxvio_L + 1, 0)
        if self.maxvio_threshold > 0 and self.maxvio_patience > 0:
            for layer in (self.high_maxvio_L == self.maxvio_patience).nonzero().flatten().tolist():
                self._event(trainer, "maxvio_high", step=step, layer=self._layers[layer][0],
                            expert=int(counts_LE[layer].argmax()), maxvio=float(maxvio_L[layer]),
                            threshold=self.maxvio_threshold, steps=self.maxvio_patience)

    def _preempt(self, trainer: L.Trainer) -> None:
        from lightning.fabric.plugins.environments import SLURMEnvironment

        signum = int(signal.SIGTERM) if self.signal_received is None else self.signal_received
        environment = trainer._accelerator_connector.cluster_environment
        requeue = signum == signal.SIGUSR1 and isinstance(environment, SLURMEnvironment) and environment.auto_requeue
        if requeue:
            # Lightning's requeue: hpc_ckpt_N.ckpt in default_root_dir (restored automatically by
            # the requeued job) and `scontrol requeue`; run here, at a step boundary, not in the handler
            trainer._signal_connector._slurm_sigusr_handler_fn(signum, None)  # type: ignore[arg-type]
            self.preempted_to = Path(trainer._checkpoint_connector._hpc_resume_path or "")
        else:
            self.preempted_to = save_checkpoint_atomically(trainer, preemption_path(trainer))
        self._event(trainer, "preempted", step=trainer.global_step, signal=signal.Signals(signum).name,
                    checkpoint=str(self.preempted_to), requeued=requeue)
        rank_zero_info(f"moeframe: preempted by {signal.Signals(signum).name} at step {trainer.global_step}; "
                       f"checkpoint saved to {self.preempted_to}")
        # this step's metrics are sent to the loggers after this hook; send them now, or the
        # logged curve would miss the step the run was preempted at
        trainer._logger_connector.update_train_step_metrics()
        raise SIGTERMException

    # -- events ---------------------------------------------------------------------------------------
    def _event(self, trainer: L.Trainer, kind: str, **fields: Any) -> None:
        record = {"event": kind, "time": round(time.time(), 3), **fields}
        self.events.append(record)
        if trainer.global_rank != 0:
            return
        rank_zero_info(f"moeframe event: {json.dumps(record)}")
        path = log_dir(trainer) / EVENTS_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
        self._log(trainer, {f"reliability/events/{kind}": float(sum(e["event"] == kind for e in self.events))},
                  int(fields.get("step", trainer.global_step)))

    @staticmethod
    def _log(trainer: L.Trainer, metrics: dict[str, float], step: int) -> None:
        if trainer.global_rank != 0:
            return
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)

    # -- checkpointing ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        # called on every rank while a checkpoint is dumped: gather every rank's RNG state
        mine = _rng_state()
        if _distributed():
            every: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(every, mine)
        else:
            every = [mine]
        return {"rng": every, "skipped_steps": self.skipped_steps, "consecutive_nonfinite": self.consecutive_nonfinite,
                "losses": list(self.losses), "zero_load_LE": self.zero_load_LE, "high_maxvio_L": self.high_maxvio_L}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        rank = dist.get_rank() if _distributed() else 0
        states = state_dict.get("rng") or []
        if rank < len(states):
            self._pending_rng = states[rank]
        else:
            rank_zero_warn(f"the checkpoint holds RNG states for {len(states)} rank(s); rank {rank} starts from its seed")
        self.skipped_steps = int(state_dict.get("skipped_steps", 0))
        self.consecutive_nonfinite = int(state_dict.get("consecutive_nonfinite", 0))
        self.losses = deque(state_dict.get("losses", []), maxlen=self.loss_spike_window)
        self.zero_load_LE, self.high_maxvio_L = state_dict.get("zero_load_LE"), state_dict.get("high_maxvio_L")


def preemption_path(trainer: L.Trainer) -> Path:
    """Where a preempted run leaves its checkpoint: ``last.ckpt`` in the ModelCheckpoint folder
    (what ``--ckpt_path last`` finds), else under ``default_root_dir/checkpoints``."""
    callback = trainer.checkpoint_callback
    folder = getattr(callback, "dirpath", None) if isinstance(callback, ModelCheckpoint) else None
    folder = trainer.strategy.broadcast(str(folder or Path(trainer.default_root_dir) / "checkpoints"))
    return Path(folder) / "last.ckpt"


def ensure_reliability_callback(trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> Reliability:
    """The run's Reliability callback, added when the config lacks one (from the module's
    ``setup``, which runs after the callbacks' own ``setup``: hence called here)."""
    for callback in trainer.callbacks:
        if isinstance(callback, Reliability):
            return callback
    callback = Reliability()
    trainer.callbacks.append(callback)
    callback.setup(trainer, pl_module, stage)
    return callback
