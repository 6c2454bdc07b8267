"""Megatron-LM's indexed dataset format (``.bin`` + ``.idx``), read and written by moeframe.

Data prepared for Megatron-LM or NeMo trains here without re-tokenising, and data prepared here
trains there. The layout (all integers little-endian):

``.bin``  the token ids of every sequence, back to back, in the index's dtype.

``.idx``  ``b"MMIDIDX\\x00\\x00"`` (9 bytes) | version ``<Q`` = 1 | dtype code ``<B`` |
          sequence count ``<Q`` | document count ``<Q`` |
          sequence lengths ``int32[sequence count]`` (tokens) |
          sequence pointers ``int64[sequence count]`` (byte offsets into ``.bin``) |
          document indices ``int64[document count]`` (sequence index where each document starts,
          starting with 0 and ending with the sequence count).

moeframe writes one sequence per document (as Megatron's ``preprocess_data.py`` does without
sentence splitting), so the document indices are ``0, 1, …, n``. Opening a dataset costs the
index only (a ``numpy.memmap``), never the tokens.

Tokens are read with ``os.pread`` on an open descriptor, not through a memory map: a ``.bin`` cut
short while a run reads it (a copy still in progress, a quota, someone else's ``truncate``) makes
a memory-mapped read past the new end of file a SIGBUS, which kills the process with no message
and no checkpoint. ``pread`` returns fewer bytes instead, which ``read`` turns into one line naming
the file. The cost is one system call and one copy per window (see benchmarks/RESULTS.md).
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import BinaryIO

import numpy as np

from moeframe.errors import ConfigError, TrainingFault

INDEX_HEADER = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
# Megatron's DType codes
DTYPE_CODES: dict[int, type] = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
}
CODE_OF_DTYPE = {np.dtype(v): k for k, v in DTYPE_CODES.items()}
_FIXED_HEADER_BYTES = 9 + 8 + 1 + 8 + 8


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (Megatron's rule: vocabularies below 65,500), else int32."""
    return np.dtype(np.uint16 if vocab_size < 65500 else np.int32)


def write_index(path: Path, dtype: np.dtype, sequence_lengths: np.ndarray, document_indices: np.ndarray) -> None:
    lengths = np.asarray(sequence_lengths, dtype=np.int32)
    pointers = np.zeros(len(lengths), dtype=np.int64)
    if len(lengths) > 1:
        pointers[1:] = np.cumsum(lengths[:-1].astype(np.int64) * np.dtype(dtype).itemsize)
    docs = np.asarray(document_indices, dtype=np.int64)
    with open(path, "wb") as f:
        f.write(INDEX_HEADER)
        f.write(struct.pack("<Q", INDEX_VERSION))
        f.write(struct.pack("<B", CODE_OF_DTYPE[np.dtype(dtype)]))
        f.write(struct.pack("<Q", len(lengths)))
        f.write(struct.pack("<Q", len(docs)))
        f.write(lengths.tobytes(order="C"))
        f.write(pointers.tobytes(order="C"))
        f.write(docs.tobytes(order="C"))


class IndexedDatasetWriter:
    """Append documents to ``<prefix>.bin``; ``finalize()`` writes ``<prefix>.idx``."""

    def __init__(self, prefix: Path, dtype: np.dtype) -> None:
        self.prefix, self.dtype = Path(prefix), np.dtype(dtype)
        self._bin: BinaryIO | None = open(self.prefix.with_suffix(".bin"), "wb")
        self._lengths: list[int] = []
        self.num_tokens = 0

    def add_document(self, ids: np.ndarray) -> None:
        assert self._bin is not None, "writer already finalised"
        self._bin.write(np.asarray(ids, dtype=self.dtype).tobytes(order="C"))
        self._lengths.append(len(ids))
        self.num_tokens += len(ids)

    @property
    def num_documents(self) -> int:
        return len(self._lengths)

    def finalize(self) -> None:
        assert self._bin is not None
        self._bin.close()
        self._bin = None
        n = len(self._lengths)
        write_index(self.prefix.with_suffix(".idx"), self.dtype, np.array(self._lengths), np.arange(n + 1))


class IndexedDataset:
    """A read-only Megatron dataset given its prefix (``path/name`` without suffix): the index
    memory-mapped, the tokens read through bounds-checked ``os.pread`` calls (see the module docstring)."""

    def __init__(self, prefix: str | Path) -> None:
        self.prefix = Path(prefix)
        idx, self.bin_path = self.prefix.with_suffix(".idx"), self.prefix.with_suffix(".bin")
        for f in (idx, self.bin_path):
            if not f.is_file():
                raise ConfigError(
                    f"indexed dataset {str(self.prefix)!r}: missing {f.name} "
                    f"(expected {idx.name} + {self.bin_path.name})"
                )
        self._read_index(idx)
        self.num_bytes = int(self.sequence_lengths.astype(np.int64).sum()) * self.dtype.itemsize
        if self.bin_path.stat().st_size != self.num_bytes:
            raise ConfigError(
                f"indexed dataset {self.bin_path}: {self.bin_path.stat().st_size} bytes, but its index describes "
                f"{self.num_bytes}; the .bin is truncated or belongs to another index: prepare the data again"
            )
        # opened now, as a memory map would be: a folder deleted during the run stays readable until
        # the check at the next epoch (PretrainDataModule._check_still_there) says so in one line
        self._fd: int | None = os.open(self.bin_path, os.O_RDONLY)

    def _read_index(self, idx: Path) -> None:
        with open(idx, "rb") as f:
            head = f.read(_FIXED_HEADER_BYTES)
        if len(head) < _FIXED_HEADER_BYTES or head[:9] != INDEX_HEADER:
            raise ConfigError(
                f"{idx} is not a Megatron indexed-dataset index (bad header): it is damaged or not an "
                "index; prepare the data again (moeframe prepare)"
            )
        version, code, n_seq, n_doc = struct.unpack("<QBQQ", head[9:])
        if version != INDEX_VERSION or code not in DTYPE_CODES:
            raise ConfigError(
                f"{idx}: unsupported index version {version} or dtype code {code}; prepare the data "
                "again (moeframe prepare)"
            )
        expected = _FIXED_HEADER_BYTES + 4 * n_seq + 8 * n_seq + 8 * n_doc
        if idx.stat().st_size != expected:  # a damaged index would read past its end
            raise ConfigError(
                f"{idx}: {idx.stat().st_size} bytes, but its header describes {expected} "
                f"({n_seq} sequences, {n_doc} documents): the index is truncated or damaged; "
                "prepare the data again (moeframe prepare)"
            )
        self.dtype = np.dtype(DTYPE_CODES[code])
        buf = np.memmap(idx, dtype=np.uint8, mode="r")
        off = _FIXED_HEADER_BYTES
        self.sequence_lengths = np.frombuffer(buf, np.int32, n_seq, off)
        off += 4 * n_seq
        self.sequence_pointers = np.frombuffer(buf, np.int64, n_seq, off)
        off += 8 * n_seq
        self.document_indices = np.frombuffer(buf, np.int64, n_doc, off)

    def __len__(self) -> int:
        return len(self.sequence_lengths)

    @property
    def num_tokens(self) -> int:
        return self.num_bytes // self.dtype.itemsize

    @property
    def tokens(self) -> np.ndarray:
        """Every token as a read-only memory map, for looking at the data (as before ``read``
        existed). Unchecked: a file truncated while mapped is a SIGBUS here; training uses ``read``."""
        if self.num_bytes == 0:
            return np.zeros(0, self.dtype)
        return np.memmap(self.bin_path, dtype=self.dtype, mode="r", shape=(self.num_tokens,))

    def _descriptor(self) -> int:
        # forked DataLoader workers share it (pread has no file offset); an unpickled copy reopens
        if self._fd is None:
            self._fd = os.open(self.bin_path, os.O_RDONLY)
        return self._fd

    def __getstate__(self) -> dict:
        # a worker started by spawn/forkserver opens its own descriptor
        return {**self.__dict__, "_fd": None}

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)

    def read(self, start: int, count: int) -> np.ndarray:
        """Tokens ``[start, start + count)``; a file cut short since it was opened is a TrainingFault."""
        count = max(0, min(count, self.num_tokens - start))
        if count == 0:
            return np.zeros(0, self.dtype)
        itemsize = self.dtype.itemsize
        data = os.pread(self._descriptor(), count * itemsize, start * itemsize)
        if len(data) < count * itemsize:
            raise TrainingFault(
                f"the shard {self.bin_path} is {os.fstat(self._descriptor()).st_size} bytes now, but its index "
                f"describes {self.num_bytes}: it was truncated during the run; restore it (or prepare the data "
                "again) and resume from the last checkpoint"
            )
        return np.frombuffer(data, dtype=self.dtype)

    def __getitem__(self, i: int) -> np.ndarray:
        start = int(self.sequence_pointers[i]) // self.dtype.itemsize
        return self.read(start, int(self.sequence_lengths[i]))
