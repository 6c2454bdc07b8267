"""``moeframe prepare``: tokenise text once into Megatron-format token shards.

Input: text files, folders (recursively), JSONL (one document per line, a chosen field) and
Parquet (a chosen column). Every document is tokenised, followed by EOS, and written to
``OUT/train/shard_XXXXX.{bin,idx}`` or, for the fixed held-out share of documents,
``OUT/val/…``; ``OUT/meta.json`` records the tokenizer (type, vocabulary, EOS id, file hash), the
inputs' fingerprint and the totals. Any ``OUT/<split>/shard_XXXXX`` is a valid Megatron-LM
dataset prefix.

Safety: everything is written into ``OUT.partial-<id>/`` and renamed to ``OUT`` only when complete,
so an interrupted run never leaves something that looks like a dataset (the next run clears the
partial folder and starts again). Re-running on unchanged input with the same tokenizer finds the
finished dataset and does nothing.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import shutil
import sys
import time
import uuid
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from moeframe.data.corpus import stdlib_files, stdlib_root
from moeframe.data.indexed import IndexedDatasetWriter, token_dtype
from moeframe.data.tokenizer import ByteTokenizer, Tokenizer, load_tokenizer
from moeframe.errors import ConfigError

META_FORMAT = "moeframe-prepared/1"
DecodeErrorPolicy = Literal["skip", "error"]


@dataclass(frozen=True)
class Source:
    """One input file and the stable name its documents are known by (held-out split, hashes)."""

    path: Path
    name: str

    @property
    def kind(self) -> str:
        suffix = self.path.suffix.lower()
        return {".jsonl": "jsonl", ".parquet": "parquet"}.get(suffix, "text")


def _is_hidden(rel: Path) -> bool:
    return any(part.startswith(".") for part in rel.parts)


def _open_error(path: Path) -> str | None:
    try:
        with path.open("rb"):
            return None
    except OSError as exc:
        return exc.strerror or type(exc).__name__


def collect_sources(inputs: list[str | Path]) -> list[Source]:
    """Every input file in a deterministic order; unreadable or missing inputs fail here."""
    sources: list[Source] = []
    for item in inputs:
        root = Path(item)
        if not root.exists():
            raise ConfigError(f"input {str(root)!r} does not exist; give text/JSONL/Parquet files or folders")
        if root.is_file():
            sources.append(Source(root, root.name))
            continue
        files = sorted(
            (p for p in root.rglob("*") if p.is_file() and not _is_hidden(p.relative_to(root))),
            key=lambda p: p.relative_to(root).as_posix(),
        )
        sources += [Source(p, f"{root.name}/{p.relative_to(root).as_posix()}") for p in files]
    unreadable = [f"{s.path} ({err})" for s in sources if (err := _open_error(s.path))]
    if unreadable:
        raise ConfigError(f"cannot read {len(unreadable)} input file(s), e.g. {unreadable[0]}; fix their permissions")
    if not sources:
        raise ConfigError(
            f"no input files found in {', '.join(map(str, inputs))}: the folder is empty "
            "(hidden files are ignored); put text, .jsonl or .parquet files in it"
        )
    return sources


def stdlib_sources(max_bytes: int | None) -> list[Source]:
    """The embedded default corpus: the running Python's stdlib sources, sorted, up to max_bytes."""
    root, out, total = stdlib_root(), [], 0
    for path in stdlib_files(root):
        if max_bytes is not None and total >= max_bytes:
            break
        total += path.stat().st_size
        out.append(Source(path, path.relative_to(root).as_posix()))
    return out


# -- reading documents --------------------------------------------------------------------------
def _documents(source: Source, field_name: str) -> Iterator[tuple[str, str]]:
    """(document name, text) pairs; raises UnicodeDecodeError on non-UTF-8 input."""
    if source.kind == "text":
        yield source.name, source.path.read_bytes().decode("utf-8")
    elif source.kind == "jsonl":
        with source.path.open("rb") as f:
            for i, line in enumerate(f):
                if line.strip():
                    yield f"{source.name}#{i}", _jsonl_text(source.path, i + 1, line, field_name)
    else:
        try:
            import pyarrow.parquet as pq
        except ImportError as exc:
            raise ConfigError(f"{source.path} is Parquet: pip install pyarrow to read it") from exc
        table = pq.read_table(source.path, columns=[field_name])
        for i, text in enumerate(table.column(field_name).to_pylist()):
            yield f"{source.name}#{i}", str(text)


def _jsonl_text(path: Path, number: int, line: bytes, field_name: str) -> str:
    """The text field of one JSONL line; a malformed or unexpected line names its file and line."""
    try:
        record = json.loads(line.decode("utf-8"))
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"{path}:{number}: not valid JSON ({exc.msg} at column {exc.colno}); fix or remove that line"
        ) from None
    if not isinstance(record, dict):
        raise ConfigError(
            f"{path}:{number}: expected a JSON object with a {field_name!r} field, got a "
            f"{type(record).__name__}; fix or remove that line"
        )
    if field_name not in record:
        raise ConfigError(f"{path}:{number}: no field {field_name!r} (set --field)")
    return str(record[field_name])


_worker_tokenizer: Tokenizer | None = None


def _init_worker(tokenizer_spec: str, eos_token: str | None) -> None:
    global _worker_tokenizer
    _worker_tokenizer = load_tokenizer(tokenizer_spec, eos_token)


def _encode(tokenizer: Tokenizer, text: str) -> np.ndarray:
    if isinstance(tokenizer, ByteTokenizer):
        ids = np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)
    else:
        ids = np.asarray(tokenizer.encode(text), dtype=np.int32)
    return np.append(ids, np.int32(tokenizer.eos_id))


@dataclass
class FileResult:
    source: Source
    documents: list[tuple[str, np.ndarray]] = field(default_factory=list)
    num_bytes: int = 0
    error: str | None = None  # non-UTF-8 input that was skipped


def _tokenize_source(args: tuple[Source, str, str]) -> FileResult:
    source, field_name, on_decode_error = args
    assert _worker_tokenizer is not None
    result = FileResult(source, num_bytes=source.path.stat().st_size)
    try:
        result.documents = [(name, _encode(_worker_tokenizer, text)) for name, text in _documents(source, field_name)]
    except UnicodeDecodeError as exc:
        if on_decode_error == "error":
            raise ConfigError(
                f"{source.path} is not valid UTF-8 ({exc.reason} at byte {exc.start}); "
                "fix or remove it, or prepare with --on-decode-error skip"
            ) from None
        result.documents, result.error = [], f"not UTF-8 at byte {exc.start}"
    return result


# -- fingerprints and metadata --------------------------------------------------------------------
def tokenizer_fingerprint(spec: str, eos_token: str | None = None) -> dict[str, Any]:
    tok = load_tokenizer(spec, eos_token)
    info: dict[str, Any] = {
        "kind": "byte" if spec == "byte" else "hf",
        "vocab_size": tok.vocab_size,
        "eos_id": tok.eos_id,
    }
    if spec != "byte":
        path = Path(spec) / "tokenizer.json" if Path(spec).is_dir() else Path(spec)
        info["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    return info


def inputs_fingerprint(sources: list[Source], options: dict[str, Any]) -> str:
    h = hashlib.sha256(json.dumps(options, sort_keys=True).encode())
    for s in sources:
        st = s.path.stat()
        h.update(f"{s.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def read_meta(out: Path) -> dict[str, Any] | None:
    """The dataset description of a prepared folder (None when there is none); a damaged one is a
    ConfigError naming it."""
    from moeframe.badinput import load_json_file

    meta = out / "meta.json"
    if not meta.is_file():
        return None
    data = load_json_file(meta, "prepared dataset description")
    missing = [k for k in ("tokenizer", "splits") if k not in data]
    if missing:
        raise ConfigError(
            f"{meta} has no {', '.join(missing)}: it is not a moeframe dataset description; "
            "prepare the data again (moeframe prepare)"
        )
    return data


# -- writing --------------------------------------------------------------------------------------
class _SplitWriter:
    """Token shards of one split, rolling over to a new shard after ``shard_tokens`` tokens."""

    def __init__(self, folder: Path, dtype: np.dtype, shard_tokens: int) -> None:
        folder.mkdir(parents=True)
        self.folder, self.dtype, self.shard_tokens = folder, dtype, shard_tokens
        self.shards: list[dict[str, int | str]] = []
        self.writer: IndexedDatasetWriter | None = None

    def add(self, ids: np.ndarray) -> None:
        if self.writer is None or self.writer.num_tokens >= self.shard_tokens:
            self._close()
            self.writer = IndexedDatasetWriter(self.folder / f"shard_{len(self.shards):05d}", self.dtype)
        self.writer.add_document(ids)

    def _close(self) -> None:
        if self.writer is not None:
            self.writer.finalize()
            self.shards.append(
                {
                    "prefix": self.writer.prefix.name,
                    "documents": self.writer.num_documents,
                    "tokens": self.writer.num_tokens,
                }
            )
            self.writer = None

    def close(self) -> dict[str, Any]:
        self._close()
        return {
            "shards": self.shards,
            "documents": sum(int(s["documents"]) for s in self.shards),
            "tokens": sum(int(s["tokens"]) for s in self.shards),
        }


def is_held_out(name: str, val_permille: int) -> bool:
    """The fixed held-out rule: CRC32 of the document name in the first val_permille of 1000."""
    return zlib.crc32(name.encode()) % 1000 < val_permille


@dataclass
class PrepareSummary:
    output: str
    documents: int
    tokens: int
    bytes: int
    seconds: float
    skipped_files: list[str]
    reused: bool = False

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("inf")

    def line(self) -> str:
        skipped = f", {len(self.skipped_files)} file(s) skipped (not UTF-8)" if self.skipped_files else ""
        totals = f"{self.documents:,} documents, {self.tokens:,} tokens from {self.bytes:,} bytes"
        if self.reused:
            return f"already prepared {self.output} (inputs and tokenizer unchanged): {totals}{skipped}"
        return f"prepared {self.output}: {totals} in {self.seconds:.1f} s ({self.tokens_per_second:,.0f} tokens/s){skipped}"


def _progress(total: int, desc: str, quiet: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, disable=quiet, file=sys.stderr)


def _clear_partials(out: Path) -> None:
    for stale in out.parent.glob(f"{out.name}.partial-*"):
        shutil.rmtree(stale, ignore_errors=True)


def prepare(
    sources: list[Source],
    out: str | Path,
    tokenizer: str = "byte",
    eos_token: str | None = None,
    field_name: str = "text",
    val_permille: int = 50,
    workers: int = 2,
    shard_tokens: int = 100_000_000,
    on_decode_error: DecodeErrorPolicy = "skip",
    overwrite: bool = False,
    quiet: bool = False,
) -> PrepareSummary:
    """Tokenise ``sources`` into ``out`` (see the module docstring); returns the summary."""
    out = Path(out)
    tok_info = tokenizer_fingerprint(tokenizer, eos_token)
    options = {
        "field": field_name,
        "val_permille": val_permille,
        "on_decode_error": on_decode_error,
        "tokenizer": tok_info,
        "shard_tokens": shard_tokens,
    }
    fingerprint = inputs_fingerprint(sources, options)
    existing = _existing_meta(out, overwrite)
    if existing is not None and existing.get("fingerprint") == fingerprint:
        return PrepareSummary(
            str(out),
            existing["documents"],
            existing["tokens"],
            existing["bytes"],
            0.0,
            existing["skipped_files"],
            reused=True,
        )
    if out.exists() and not overwrite:
        raise ConfigError(
            f"{out} already holds a different dataset (other inputs, options or tokenizer); "
            "choose another output folder or pass --overwrite"
        )
    _clear_partials(out)
    partial = out.parent / f"{out.name}.partial-{uuid.uuid4().hex[:8]}"
    try:
        meta = _write_dataset(
            sources,
            partial,
            tokenizer,
            eos_token,
            field_name,
            val_permille,
            workers,
            shard_tokens,
            on_decode_error,
            tok_info,
            quiet,
        )
        meta.update(fingerprint=fingerprint, options=options)
        (partial / "meta.json").write_text(json.dumps(meta, indent=2))
        _swap_into_place(partial, out)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return PrepareSummary(
        str(out), meta["documents"], meta["tokens"], meta["bytes"], meta["seconds"], meta["skipped_files"]
    )


def _existing_meta(out: Path, overwrite: bool) -> dict[str, Any] | None:
    """The description of the dataset already at ``out``; a damaged one is replaced with
    ``--overwrite`` and otherwise an error that says so."""
    try:
        return read_meta(out)
    except ConfigError as exc:
        if overwrite:
            return None
        raise ConfigError(f"{exc} (or pass --overwrite to replace it)") from None


def _swap_into_place(partial: Path, out: Path) -> None:
    """Rename the finished dataset into place; an old one is removed only after that succeeds."""
    old = out.parent / f"{out.name}.old-{uuid.uuid4().hex[:8]}"
    if out.exists():
        os.rename(out, old)
    os.rename(partial, out)
    shutil.rmtree(old, ignore_errors=True)


def _write_dataset(
    sources: list[Source],
    folder: Path,
    tokenizer: str,
    eos_token: str | None,
    field_name: str,
    val_permille: int,
    workers: int,
    shard_tokens: int,
    on_decode_error: DecodeErrorPolicy,
    tok_info: dict[str, Any],
    quiet: bool,
) -> dict[str, Any]:
    dtype = token_dtype(tok_info["vocab_size"])
    folder.mkdir(parents=True)
    splits = {"train": _SplitWriter(folder / "train", dtype, shard_tokens)}
    if val_permille > 0:
        splits["val"] = _SplitWriter(folder / "val", dtype, shard_tokens)
    skipped: list[str] = []
    total_bytes, start = 0, time.perf_counter()
    jobs = [(s, field_name, on_decode_error) for s in sources]
    bar = _progress(sum(s.path.stat().st_size for s in sources), f"tokenising {len(sources)} files", quiet)
    ctx = mp.get_context("spawn") if workers > 1 else None
    pool = ctx.Pool(workers, _init_worker, (tokenizer, eos_token)) if ctx else None
    try:
        if pool is None:
            _init_worker(tokenizer, eos_token)
        chunk = max(1, len(jobs) // (workers * 8))  # fewer round trips for many small files
        results = pool.imap(_tokenize_source, jobs, chunksize=chunk) if pool else map(_tokenize_source, jobs)
        for result in results:  # imap keeps input order: output is identical for any worker count
            total_bytes += result.num_bytes
            bar.update(result.num_bytes)
            if result.error:
                skipped.append(f"{result.source.path}: {result.error}")
            for name, ids in result.documents:
                held_out = "val" in splits and is_held_out(name, val_permille)
                splits["val" if held_out else "train"].add(ids)
    finally:
        bar.close()
        if pool is not None:
            pool.close()
            pool.join()
    split_meta = {name: writer.close() for name, writer in splits.items()}
    if skipped and not quiet:
        print(f"warning: skipped {len(skipped)} file(s) that are not UTF-8, e.g. {skipped[0]}", file=sys.stderr)
    return {
        "format": META_FORMAT,
        "tokenizer": tok_info,
        "dtype": dtype.name,
        "splits": split_meta,
        "documents": sum(m["documents"] for m in split_meta.values()),
        "tokens": sum(m["tokens"] for m in split_meta.values()),
        "bytes": total_bytes,
        "seconds": time.perf_counter() - start,
        "skipped_files": skipped,
    }


def __getattr__(name: str) -> Any:
    # the command front-end that lived here before moeframe.commands (deprecated, one release)
    from moeframe.deprecated_commands import old_name

    return old_name(__name__, name)
