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
sentence splitting), so the document indices are ``0, 1, …, n``. Both files are read through
``numpy.memmap``: opening a dataset costs the index only, never the tokens.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import BinaryIO, Optional

import numpy as np

from moeframe.errors import ConfigError

INDEX_HEADER = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
# Megatron's DType codes
DTYPE_CODES: dict[int, type] = {
    1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32, 8: np.uint16,
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
        self._bin: Optional[BinaryIO] = open(self.prefix.with_suffix(".bin"), "wb")
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
    """A read-only, memory-mapped Megatron dataset given its prefix (``path/name`` without suffix)."""

    def __init__(self, prefix: str | Path) -> None:
        self.prefix = Path(prefix)
        idx, bin_ = self.prefix.with_suffix(".idx"), self.prefix.with_suffix(".bin")
        for f in (idx, bin_):
            if not f.is_file():
                raise ConfigError(f"indexed dataset {str(self.prefix)!r}: missing {f.name} (expected {idx.name} + {bin_.name})")
        self._read_index(idx)
        expected = int(self.sequence_lengths.astype(np.int64).sum()) * self.dtype.itemsize
        if bin_.stat().st_size != expected:
            raise ConfigError(
                f"indexed dataset {bin_}: {bin_.stat().st_size} bytes, but its index describes {expected}; "
                "the .bin is truncated or belongs to another index: prepare the data again"
            )
        self.tokens = np.memmap(bin_, dtype=self.dtype, mode="r") if expected else np.zeros(0, self.dtype)

    def _read_index(self, idx: Path) -> None:
        with open(idx, "rb") as f:
            head = f.read(_FIXED_HEADER_BYTES)
        if len(head) < _FIXED_HEADER_BYTES or head[:9] != INDEX_HEADER:
            raise ConfigError(f"{idx} is not a Megatron indexed-dataset index (bad header): it is damaged or not an "
                              "index; prepare the data again (moeframe prepare)")
        version, code, n_seq, n_doc = struct.unpack("<QBQQ", head[9:])
        if version != INDEX_VERSION or code not in DTYPE_CODES:
            raise ConfigError(f"{idx}: unsupported index version {version} or dtype code {code}; prepare the data "
                              "again (moeframe prepare)")
        expected = _FIXED_HEADER_BYTES + 4 * n_seq + 8 * n_seq + 8 * n_doc
        if idx.stat().st_size != expected:  # a damaged index would read past its end
            raise ConfigError(f"{idx}: {idx.stat().st_size} bytes, but its header describes {expected} "
                              f"({n_seq} sequences, {n_doc} documents): the index is truncated or damaged; "
                              "prepare the data again (moeframe prepare)")
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
        return len(self.tokens)

    def __getitem__(self, i: int) -> np.ndarray:
        start = int(self.sequence_pointers[i]) // self.dtype.itemsize
        return np.asarray(self.tokens[start: start + int(self.sequence_lengths[i])])
