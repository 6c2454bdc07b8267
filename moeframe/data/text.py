"""``TextDataModule``: next-token training on a token stream cut into fixed-length windows.

Documents (stdlib files by default, or the user's files) are tokenised, joined with EOS and held
in memory as one int32 array per split; window ``i`` is tokens ``[i·T, i·T + T]`` (T+1 tokens:
inputs and shifted labels). The held-out split is fixed: a document is validation data when the
CRC32 of its name falls in the first ``val_permille`` of 1000 buckets, so it does not depend on
file order, seed or machine. Inputs with too few documents for that (a single text file) hold
out the stream's tail instead.
"""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Iterable, Optional

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, Dataset

from moeframe.config import ConfigError
from moeframe.data.corpus import Document, stdlib_documents, user_documents, user_files
from moeframe.data.tokenizer import ByteTokenizer, Tokenizer, load_tokenizer


class TokenWindows(Dataset):
    """Non-overlapping windows of ``seq_len + 1`` tokens from one token array."""

    def __init__(self, tokens: np.ndarray, seq_len: int, eos_id: int, document_masking: bool) -> None:
        self.tokens, self.seq_len, self.eos_id = tokens, seq_len, eos_id
        self.document_masking = document_masking

    def __len__(self) -> int:
        return max(0, (len(self.tokens) - 1) // self.seq_len)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        window = torch.from_numpy(self.tokens[i * self.seq_len: (i + 1) * self.seq_len + 1].astype(np.int64))
        item = {"input_ids": window[:-1], "labels": window[1:]}
        if self.document_masking:
            # a new document starts right after each EOS
            item["document_ids"] = torch.cumsum(window[:-1] == self.eos_id, 0) - (window[:-1] == self.eos_id).long()
        return item


def _tokenize(documents: Iterable[Document], tokenizer: Tokenizer) -> list[tuple[str, np.ndarray]]:
    eos = np.array([tokenizer.eos_id], dtype=np.int32)
    out = []
    for doc in documents:
        if isinstance(tokenizer, ByteTokenizer):
            ids = np.frombuffer(doc.data, dtype=np.uint8).astype(np.int32)
        else:
            ids = np.asarray(tokenizer.encode(doc.data.decode("utf-8", errors="replace")), dtype=np.int32)
        out.append((doc.name, np.concatenate([ids, eos])))
    return out


def split_documents(
    docs: list[tuple[str, np.ndarray]], val_permille: int, min_tokens: int
) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) token streams; by document-name hash, or the stream's tail when that fails."""
    is_val = [zlib.crc32(name.encode()) % 1000 < val_permille for name, _ in docs]
    train = [ids for (_, ids), v in zip(docs, is_val) if not v]
    val = [ids for (_, ids), v in zip(docs, is_val) if v]
    if sum(map(len, train)) >= min_tokens and sum(map(len, val)) >= min_tokens:
        return np.concatenate(train), np.concatenate(val)
    stream = np.concatenate([ids for _, ids in docs]) if docs else np.zeros(0, np.int32)
    n_val = max(min_tokens, len(stream) * val_permille // 1000)
    if len(stream) - n_val < min_tokens:
        raise ConfigError(
            f"the data holds {len(stream)} tokens, too few for a train and a validation split of "
            f"at least {min_tokens} tokens each (data.seq_len + 1); add text or lower data.seq_len"
        )
    return stream[:-n_val], stream[-n_val:]


class TextDataModule(L.LightningDataModule):
    """Pretraining text. ``path=None`` uses the embedded default corpus (Python stdlib sources).

    Args:
        path: a text file or a folder of text files; None for the default corpus.
        tokenizer: ``"byte"`` or the path of a HF ``tokenizer.json``.
        eos_token: the tokenizer's end-of-document token (auto-detected when None).
        seq_len: tokens per training sequence.
        batch_size: sequences per micro-batch (per device).
        val_permille: share of documents (per mille) held out for validation.
        max_bytes: read at most this much raw text (None: everything).
        num_workers: DataLoader worker processes.
        document_masking: also yield ``document_ids`` so attention never crosses a document.
    """

    def __init__(
        self,
        path: Optional[str] = None,
        tokenizer: str = "byte",
        eos_token: Optional[str] = None,
        seq_len: int = 256,
        batch_size: int = 16,
        val_permille: int = 50,
        max_bytes: Optional[int] = 4_000_000,
        num_workers: int = 0,
        document_masking: bool = False,
    ) -> None:
        super().__init__()
        for name, value in (("seq_len", seq_len), ("batch_size", batch_size)):
            if value <= 0:
                raise ConfigError(f"data.{name} must be a positive integer, got {value}")
        if not 0 < val_permille < 1000:
            raise ConfigError(f"data.val_permille must be between 1 and 999, got {val_permille}")
        if path is not None:
            user_files(Path(path))  # fail now, with a clear message, not after model setup
        self.path, self.seq_len, self.batch_size = path, seq_len, batch_size
        self.val_permille, self.max_bytes, self.num_workers = val_permille, max_bytes, num_workers
        self.document_masking = document_masking
        self.tokenizer = load_tokenizer(tokenizer, eos_token)
        self.train_tokens: Optional[np.ndarray] = None
        self.val_tokens: Optional[np.ndarray] = None

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def _documents(self) -> Iterable[Document]:
        if self.path is None:
            return stdlib_documents(self.max_bytes)
        return user_documents(Path(self.path), self.max_bytes)

    def setup(self, stage: str) -> None:
        if self.train_tokens is not None:
            return
        docs = _tokenize(self._documents(), self.tokenizer)
        self.train_tokens, self.val_tokens = split_documents(docs, self.val_permille, self.seq_len + 1)
        source = self.path or "the Python standard library sources (embedded default corpus)"
        rank_zero_info(
            f"data: {len(docs)} documents from {source}; {len(self.train_tokens):,} train / "
            f"{len(self.val_tokens):,} validation tokens"
        )

    def _loader(self, tokens: Optional[np.ndarray], shuffle: bool) -> DataLoader:
        assert tokens is not None, "setup() must run before the dataloaders are requested"
        dataset = TokenWindows(tokens, self.seq_len, self.tokenizer.eos_id, self.document_masking)
        return DataLoader(
            dataset, batch_size=self.batch_size, shuffle=shuffle, drop_last=shuffle,
            num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_tokens, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_tokens, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.val_tokens, shuffle=False)
