"""``PretrainDataModule``: fixed-length sequences streamed from token shards, resumable exactly.

Where the tokens come from (``path``, one entry or a list blended by ``weights``):
- nothing: the embedded default corpus (Python stdlib sources), prepared on first use into the
  cache folder (``$MOEFRAME_CACHE`` or ``~/.cache/moeframe``);
- a folder made by ``moeframe prepare`` (its ``meta.json`` is checked against the tokenizer);
- a Megatron-LM dataset prefix (``…/name`` with ``name.bin`` + ``name.idx``);
- raw text files/folders/JSONL, prepared into the cache folder first.

Sequences: each shard's token stream is cut into windows of ``seq_len + 1`` tokens (inputs plus
shifted labels), each read from its file when its batch is built (bounds-checked ``pread``, see
``moeframe.data.indexed``), so the data never has to fit in memory.

Order: each epoch, a blend of the datasets by ``weights`` (a dataset smaller than its share is
repeated, a larger one subsampled) is shuffled with ``seed + epoch``. Rank ``r`` of ``W`` takes
every W-th sample starting at r (disjoint shares), groups them into batches, and its DataLoader
worker ``w`` of ``K`` builds batches ``start + w, start + w + K, …`` so that the loader's
round-robin order is exactly the batch order. The module's ``state_dict`` (epoch, batches
consumed) is saved in Lightning checkpoints; after a resume the stream continues with the very
next batch, nothing repeated or skipped, whatever the number of ranks or workers.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from moeframe.config import ConfigError
from moeframe.errors import TrainingFault
from moeframe.layout import data_parallel_rank_size

# Lightning warns that an IterableDataset with __len__ may duplicate data across workers; this
# module splits batches across workers itself (see ShardedBatches), so the warning does not apply.
warnings.filterwarnings("ignore", message=r".*`IterableDataset` has `__len__` defined.*")
from moeframe.data.indexed import IndexedDataset
from moeframe.data.prepare import (
    DecodeErrorPolicy,
    collect_sources,
    inputs_fingerprint,
    prepare,
    read_meta,
    stdlib_sources,
    tokenizer_fingerprint,
)
from moeframe.data.tokenizer import load_tokenizer


def cache_dir() -> Path:
    return Path(os.environ.get("MOEFRAME_CACHE", Path.home() / ".cache" / "moeframe"))


class TokenSource:
    """One dataset: token shards seen as a list of (seq_len + 1)-token windows."""

    def __init__(self, shards: list[IndexedDataset], seq_len: int, name: str) -> None:
        self.shards, self.seq_len, self.name = shards, seq_len, name
        per_shard = [max(0, (s.num_tokens - 1) // seq_len) for s in shards]
        self.offsets = np.concatenate([[0], np.cumsum(per_shard)]).astype(np.int64)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def window(self, i: int) -> np.ndarray:
        shard = int(np.searchsorted(self.offsets, i, side="right") - 1)
        start = (i - int(self.offsets[shard])) * self.seq_len
        return self.shards[shard].read(start, self.seq_len + 1).astype(np.int64)


def blend_order(sizes: list[int], weights: list[float], seed: int, epoch: int) -> np.ndarray:
    """[N, 2] (dataset, window) pairs of one epoch: N = Σ sizes, dataset d gets round(w_d·N)."""
    total = sum(sizes)
    w = np.asarray(weights, dtype=np.float64) / sum(weights)
    counts = np.floor(w * total).astype(np.int64)
    # hand the rounding remainder to the largest fractional parts (deterministic)
    for d in np.argsort(-(w * total - counts), kind="stable")[: total - counts.sum()]:
        counts[d] += 1
    rng = np.random.default_rng([seed, epoch])
    parts = []
    for d, (size, count) in enumerate(zip(sizes, counts)):
        repeats = [rng.permutation(size) for _ in range(-(-int(count) // size))] if size else []
        picks = np.concatenate(repeats)[:count] if repeats else np.zeros(0, np.int64)
        parts.append(np.stack([np.full(len(picks), d), picks], axis=1))
    order = np.concatenate(parts) if parts else np.zeros((0, 2), np.int64)
    return order[rng.permutation(len(order))]


def _batch(windows: list[np.ndarray], eos_id: int, document_masking: bool) -> dict[str, torch.Tensor]:
    stacked = torch.from_numpy(np.stack(windows))
    batch = {"input_ids": stacked[:, :-1].contiguous(), "labels": stacked[:, 1:].contiguous()}
    if document_masking:
        is_eos = batch["input_ids"] == eos_id
        batch["document_ids"] = torch.cumsum(is_eos, 1) - is_eos.long()  # a document starts after EOS
    return batch


class ShardedBatches(IterableDataset):
    """This rank's batches of one epoch, split over DataLoader workers in round-robin order."""

    def __init__(
        self,
        sources: list[TokenSource],
        weights: list[float],
        batch_size: int,
        seed: int,
        eos_id: int,
        document_masking: bool,
        shuffle: bool,
    ) -> None:
        self.sources, self.weights, self.batch_size, self.seed = sources, weights, batch_size, seed
        self.eos_id, self.document_masking, self.shuffle = eos_id, document_masking, shuffle
        self.rank, self.world_size = 0, 1
        self.epoch, self.start_batch = 0, 0

    def _order(self) -> np.ndarray:
        if self.shuffle:
            return blend_order([len(s) for s in self.sources], self.weights, self.seed, self.epoch)
        return np.concatenate(
            [np.stack([np.full(len(s), d), np.arange(len(s))], 1) for d, s in enumerate(self.sources)]
        )

    def rank_samples(self) -> np.ndarray:
        return self._order()[self.rank :: self.world_size]

    def __len__(self) -> int:
        # every rank yields the same number of batches, so ranks stay in lockstep
        total = sum(len(s) for s in self.sources) // self.world_size
        return total // self.batch_size if self.shuffle else -(-total // self.batch_size)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor] | _FaultInWorker]:
        samples = self.rank_samples()
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        try:
            for b in range(self.start_batch + worker, len(self), num_workers):
                rows = samples[b * self.batch_size : (b + 1) * self.batch_size]
                yield _batch([self.sources[d].window(i) for d, i in rows], self.eos_id, self.document_masking)
        except TrainingFault as fault:
            if info is None:
                raise
            yield _FaultInWorker(str(fault))


@dataclass
class _FaultInWorker:
    """A TrainingFault raised in a DataLoader worker, sent to the main process in its batch's place
    and raised there with its own message (raised in the worker, it would reach the main process
    re-raised by torch, with the worker's traceback folded into the message)."""

    reason: str


def _raise_worker_faults(batches: Iterator[Any]) -> Iterator[Any]:
    for batch in batches:
        if isinstance(batch, _FaultInWorker):
            raise TrainingFault(batch.reason)
        yield batch


class _FaultRaisingLoader(DataLoader):
    """A DataLoader that raises a worker's TrainingFault in the main process with its own message."""

    def __iter__(self) -> Iterator[Any]:
        # the workers start here, with the dataset as it is now (its epoch and start position)
        return _raise_worker_faults(super().__iter__())


class _ResumableLoader(_FaultRaisingLoader):
    """A DataLoader that positions its dataset at the DataModule's saved place on every ``iter``."""

    def __init__(self, dataset: ShardedBatches, datamodule: PretrainDataModule, num_workers: int) -> None:
        # its own generator: creating an iterator draws a worker seed, which must not advance the
        # global torch RNG (an exact resume restores that stream at the step boundary, and a
        # resumed run creates its iterator at another moment than the uninterrupted one)
        super().__init__(dataset, batch_size=None, num_workers=num_workers, generator=torch.Generator().manual_seed(0))
        self.datamodule = datamodule

    def __iter__(self) -> Iterator[Any]:
        self.datamodule._position(self.dataset)
        return super().__iter__()

    # Lightning's fit loop calls a loader resumable when it has state_dict/load_state_dict (else it
    # warns on every mid-epoch resume that the run may repeat or skip data, which is not the case
    # here) and saves that state in the checkpoint's loop state. The position it saves is the
    # DataModule's own (also saved in the DataModule's checkpoint entry, read before this one).
    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.datamodule.epoch, "consumed": self.datamodule.consumed}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.datamodule.epoch, self.datamodule.consumed = state_dict["epoch"], state_dict["consumed"]


@dataclass
class _Entry:
    train: TokenSource
    val: TokenSource | None


class PretrainDataModule(L.LightningDataModule):
    """Pretraining data from token shards (see the module docstring).

    Args:
        path: None (default corpus), or one entry / a list of entries: a prepared folder, a
            Megatron prefix, or raw text files/folders/JSONL to prepare into the cache.
        weights: blend weights, one per entry (None: proportional to size).
        tokenizer: ``"byte"`` or a HF ``tokenizer.json``; must match how the data was prepared.
        eos_token: the tokenizer's end-of-document token (auto-detected when None).
        seq_len: tokens per sequence.
        batch_size: sequences per micro-batch per rank.
        seed: shuffling seed (epoch e uses seed and e).
        num_workers: DataLoader worker processes per rank.
        document_masking: also yield ``document_ids`` (attention never crosses a document).
        val_permille: held-out share of documents when raw text is prepared here.
        max_bytes: how much of the default corpus to use.
        field: JSONL field holding the text when raw JSONL is prepared here.
        on_decode_error: ``skip`` (counted, warned) or ``error`` for non-UTF-8 raw input.
    """

    def __init__(
        self,
        path: str | list[str] | None = None,
        weights: list[float] | None = None,
        tokenizer: str = "byte",
        eos_token: str | None = None,
        seq_len: int = 256,
        batch_size: int = 16,
        seed: int = 1234,
        num_workers: int = 0,
        document_masking: bool = False,
        val_permille: int = 50,
        max_bytes: int | None = 4_000_000,
        field: str = "text",
        on_decode_error: DecodeErrorPolicy = "skip",
    ) -> None:
        super().__init__()
        for name, value in (("seq_len", seq_len), ("batch_size", batch_size)):
            if value <= 0:
                raise ConfigError(f"data.{name} must be a positive integer, got {value}")
        self.entries = [] if path is None else ([path] if isinstance(path, str) else list(path))
        if weights is not None and len(weights) != max(1, len(self.entries)):
            raise ConfigError(f"data.weights has {len(weights)} values for {len(self.entries)} data.path entries")
        if weights is not None and (min(weights) < 0 or sum(weights) <= 0):
            raise ConfigError(f"data.weights must be non-negative with a positive sum, got {weights}")
        for entry in self.entries:
            if not (Path(entry).exists() or Path(entry).with_suffix(".idx").is_file()):
                raise ConfigError(
                    f"data.path {entry!r} does not exist: give a prepared folder, a Megatron "
                    "prefix (name.bin + name.idx) or text files/folders"
                )
            if Path(entry).is_dir() and read_meta(Path(entry)) is None:
                collect_sources([entry])  # raw text: fail now if it is empty or unreadable
        self.tokenizer_spec, self.eos_token = tokenizer, eos_token
        self.tokenizer = load_tokenizer(tokenizer, eos_token)
        self.weights, self.seq_len, self.batch_size, self.seed = weights, seq_len, batch_size, seed
        self.num_workers, self.document_masking = num_workers, document_masking
        self.val_permille, self.max_bytes, self.field, self.on_decode_error = (
            val_permille,
            max_bytes,
            field,
            on_decode_error,
        )
        self.epoch, self.consumed = 0, 0
        self._train: ShardedBatches | None = None
        self._val: ShardedBatches | None = None

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    # -- locating and preparing data -----------------------------------------------------------
    def _is_megatron_prefix(self, entry: str | None) -> bool:
        return entry is not None and not Path(entry).is_dir() and Path(entry).with_suffix(".idx").is_file()

    def _prepared_folder(self, entry: str | None, prepare_now: bool) -> Path:
        """Where an entry's prepared shards live; raw text is prepared into the cache."""
        if entry is not None and read_meta(Path(entry)) is not None:
            return Path(entry)
        sources = stdlib_sources(self.max_bytes) if entry is None else collect_sources([entry])
        options = {
            "field": self.field,
            "val_permille": self.val_permille,
            "on_decode_error": self.on_decode_error,
            "tokenizer": tokenizer_fingerprint(self.tokenizer_spec, self.eos_token),
        }
        out = cache_dir() / "prepared" / inputs_fingerprint(sources, options)[:20]
        if prepare_now and read_meta(out) is None:
            summary = prepare(
                sources,
                out,
                self.tokenizer_spec,
                self.eos_token,
                self.field,
                self.val_permille,
                workers=1,
                on_decode_error=self.on_decode_error,
                quiet=True,
            )
            rank_zero_info(summary.line())
        return out

    def prepare_data(self) -> None:
        # Lightning runs this on one process per node, then a barrier: ranks never race to write
        for entry in self.entries or [None]:
            if not self._is_megatron_prefix(entry):
                self._prepared_folder(entry, prepare_now=True)

    def _check_meta(self, folder: Path, meta: dict[str, Any]) -> None:
        ours = tokenizer_fingerprint(self.tokenizer_spec, self.eos_token)
        theirs = meta["tokenizer"]
        if any(theirs.get(k) != ours.get(k) for k in ("kind", "vocab_size", "eos_id", "sha256")):
            raise ConfigError(
                f"{folder} was prepared with another tokenizer ({theirs['kind']}, vocab {theirs['vocab_size']}, "
                f"eos {theirs['eos_id']}) than data.tokenizer={self.tokenizer_spec!r} ({ours['kind']}, vocab "
                f"{ours['vocab_size']}, eos {ours['eos_id']}); prepare it again or use the matching tokenizer"
            )

    def _open(self, entry: str | None) -> _Entry:
        if self._is_megatron_prefix(entry):
            return self._open_megatron(Path(entry))  # type: ignore[arg-type]
        folder = self._prepared_folder(entry, prepare_now=self.trainer is None)
        meta = read_meta(folder)
        if meta is None:
            raise ConfigError(f"{folder} is not prepared (prepare_data() did not run on this node?)")
        self._check_meta(folder, meta)
        split = {
            name: TokenSource(
                [IndexedDataset(folder / name / s["prefix"]) for s in info["shards"]], self.seq_len, f"{folder}:{name}"
            )
            for name, info in meta["splits"].items()
        }
        return _Entry(split["train"], split.get("val"))

    def _open_megatron(self, prefix: Path) -> _Entry:
        """A Megatron prefix carries no metadata: the last val_permille of its windows are held out."""
        dataset = IndexedDataset(prefix)
        full = TokenSource([dataset], self.seq_len, str(prefix))
        # a cheap sanity check on the head of the data (a full scan would read terabytes)
        head_max = int(dataset.read(0, 10_000_000).max()) if dataset.num_tokens else 0
        if head_max >= self.vocab_size:
            raise ConfigError(
                f"{prefix} holds token id {head_max}, beyond the tokenizer's vocabulary of "
                f"{self.vocab_size}; use the tokenizer the data was made with"
            )
        n_val = len(full) * self.val_permille // 1000
        val = _Slice(full, len(full) - n_val, len(full)) if n_val else None
        return _Entry(_Slice(full, 0, len(full) - n_val), val)

    def setup(self, stage: str) -> None:
        if self._train is not None:
            return
        entries = [self._open(e) for e in (self.entries or [None])]
        weights = self.weights or [float(len(e.train)) for e in entries]
        if any(len(e.train) == 0 for e in entries):
            raise ConfigError(f"a data.path entry holds fewer than data.seq_len + 1 = {self.seq_len + 1} tokens")
        eos, dm = self.tokenizer.eos_id, self.document_masking
        self._train = ShardedBatches([e.train for e in entries], weights, self.batch_size, self.seed, eos, dm, True)
        vals = [e.val for e in entries if e.val is not None and len(e.val)]
        self._val = (
            ShardedBatches(vals, [1.0] * len(vals), self.batch_size, self.seed, eos, dm, False) if vals else None
        )
        for ds in (self._train, self._val):
            if ds is not None and self.trainer is not None:
                ds.rank, ds.world_size = data_parallel_rank_size(self.trainer)
        if len(self._train) == 0:
            raise ConfigError(
                f"too little data for data.batch_size={self.batch_size} on {self._train.world_size} rank(s)"
            )
        rank_zero_info(
            f"data: {sum(len(s) for s in self._train.sources):,} training sequences of {self.seq_len} "
            f"tokens from {len(entries)} dataset(s); {len(self._train)} batches per epoch per rank"
        )

    # -- loaders and exact resume --------------------------------------------------------------
    def _check_still_there(self, dataset: ShardedBatches) -> None:
        """Open shards keep working when their folder is deleted (the kernel keeps the files until
        their descriptors are closed), but the next restart would fail and an unmounted
        filesystem fails reads: stop with one line at the next epoch or validation instead."""
        for source in dataset.sources:
            for shard in getattr(getattr(source, "base", source), "shards", []):
                if not shard.prefix.with_suffix(".bin").is_file():
                    gone = shard.prefix.parent
                    while not gone.parent.exists():  # name the folder that went, not a file inside it
                        gone = gone.parent
                    raise TrainingFault(
                        f"the data folder {gone} disappeared during the run (epoch {self.epoch}); "
                        "restore it and resume from the last checkpoint"
                    )

    def _position(self, dataset: ShardedBatches) -> None:
        self._check_still_there(dataset)
        if dataset is self._train:
            if self.consumed >= len(dataset):  # the previous epoch is complete
                self.epoch, self.consumed = self.epoch + 1, 0
            dataset.epoch, dataset.start_batch = self.epoch, self.consumed

    def train_dataloader(self) -> DataLoader:
        assert self._train is not None, "setup() first"
        return _ResumableLoader(self._train, self, self.num_workers)

    def val_dataloader(self) -> Any:
        if self._val is None:
            return []
        return _ResumableLoader(self._val, self, self.num_workers)

    def test_dataloader(self) -> Any:
        """``moeframe test`` evaluates the held-out split (the validation sequences)."""
        return self.val_dataloader()

    def predict_dataloader(self) -> Any:
        """``moeframe predict`` runs the model over the held-out split too (greedy next tokens). A
        plain DataLoader: Lightning rebuilds the predict loader from its constructor arguments."""
        if self._val is None:
            return []
        return _FaultRaisingLoader(
            self._val, batch_size=None, num_workers=self.num_workers, generator=torch.Generator().manual_seed(0)
        )

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if self.trainer is not None and self.trainer.training:
            self.consumed += 1  # counted when the training loop takes the batch, not when prefetched
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "consumed": self.consumed, "seed": self.seed, "batch_size": self.batch_size}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if (state_dict["seed"], state_dict["batch_size"]) != (self.seed, self.batch_size):
            raise ConfigError(
                "resuming with another data.seed or data.batch_size would not continue the same "
                f"stream (checkpoint: seed {state_dict['seed']}, batch {state_dict['batch_size']})"
            )
        self.epoch, self.consumed = state_dict["epoch"], state_dict["consumed"]


class _Slice(TokenSource):
    """A contiguous range of another source's windows (train/val split of a Megatron prefix)."""

    def __init__(self, base: TokenSource, start: int, stop: int) -> None:
        self.base, self.start, self.stop = base, start, stop
        self.seq_len, self.name = base.seq_len, base.name

    def __len__(self) -> int:
        return self.stop - self.start

    def window(self, i: int) -> np.ndarray:
        return self.base.window(self.start + i)
