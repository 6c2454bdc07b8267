"""Prepared token shards: Megatron byte layout, exact resume, disjoint rank shares, bad input."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from moeframe.config import ConfigError
from moeframe.data.indexed import IndexedDataset
from moeframe.data.prepare import collect_sources, prepare
from moeframe.data.shards import PretrainDataModule, ShardedBatches, blend_order

from .conftest import REPO, clean_env


def _corpus(folder: Path, n_docs: int = 40) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        (folder / f"doc{i:03d}.txt").write_text(f"document number {i}. " + "lorem ipsum dolor sit amet " * (3 + i % 7))
    return folder


@pytest.fixture
def prepared(tmp_path: Path) -> Path:
    out = tmp_path / "prepared"
    prepare(collect_sources([_corpus(tmp_path / "raw")]), out, workers=1, quiet=True)
    return out


# -- the Megatron layout, checked against the published description, byte by byte ----------------
def test_idx_and_bin_layout_match_megatron(tmp_path: Path) -> None:
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "a.txt").write_bytes(b"hi")
    (tmp_path / "raw" / "b.txt").write_bytes(b"abc")
    prepare(collect_sources([tmp_path / "raw"]), tmp_path / "out", val_permille=0, workers=1, quiet=True)
    prefix = tmp_path / "out" / "train" / "shard_00000"
    idx = prefix.with_suffix(".idx").read_bytes()
    expected = (
        b"MMIDIDX\x00\x00"  # magic
        + struct.pack("<Q", 1)  # version
        + struct.pack("<B", 8)  # dtype code 8 = uint16 (byte vocab < 65500)
        + struct.pack("<Q", 2)  # sequences: one per document
        + struct.pack("<Q", 3)  # document index entries: n + 1
        + struct.pack("<2i", 3, 4)  # lengths: 'hi'+EOS, 'abc'+EOS
        + struct.pack("<2q", 0, 6)  # byte pointers: 0, 3 tokens * 2 bytes
        + struct.pack("<3q", 0, 1, 2)  # document indices
    )
    assert idx == expected
    assert prefix.with_suffix(".bin").read_bytes() == struct.pack("<7H", 104, 105, 256, 97, 98, 99, 256)


def test_reads_a_dataset_written_independently_from_the_description(tmp_path: Path) -> None:
    docs = [np.array([5, 6, 7, 1], np.int32), np.array([9, 1], np.int32), np.array([2, 3, 4, 5, 1], np.int32)]
    prefix = tmp_path / "megatron_text_document"
    prefix.with_suffix(".bin").write_bytes(b"".join(d.tobytes() for d in docs))
    lengths = [len(d) for d in docs]
    pointers = [0, 16, 24]  # int32 tokens: 4 bytes each
    with open(prefix.with_suffix(".idx"), "wb") as f:
        f.write(b"MMIDIDX\x00\x00" + struct.pack("<QBQQ", 1, 4, 3, 4))
        f.write(struct.pack("<3i", *lengths) + struct.pack("<3q", *pointers) + struct.pack("<4q", 0, 1, 2, 3))
    ds = IndexedDataset(prefix)
    assert ds.dtype == np.int32 and len(ds) == 3 and list(ds.document_indices) == [0, 1, 2, 3]
    for i, d in enumerate(docs):
        assert np.array_equal(ds[i], d)
    # and it trains: a Megatron prefix is a valid data.path
    dm = PretrainDataModule(path=str(prefix), seq_len=2, batch_size=1, val_permille=0)
    dm.setup("fit")
    first = next(iter(dm.train_dataloader()))
    assert first["input_ids"].shape == (1, 2)


def test_truncated_bin_is_rejected(tmp_path: Path, prepared: Path) -> None:
    bin_ = prepared / "train" / "shard_00000.bin"
    bin_.write_bytes(bin_.read_bytes()[:-2])
    with pytest.raises(ConfigError, match="truncated"):
        IndexedDataset(bin_.with_suffix(""))


@pytest.mark.bad_input
def test_bin_truncated_after_opening_is_a_fault_naming_the_file(tmp_path: Path, prepared: Path) -> None:
    """Cut short after it was opened (and read): the next read past the new end is a TrainingFault
    naming the file, where a memory-mapped read would have been a SIGBUS."""
    from moeframe.errors import TrainingFault

    ds = IndexedDataset(prepared / "train" / "shard_00000")
    head = ds.read(0, 8).copy()
    os.truncate(ds.bin_path, 6)
    assert np.array_equal(ds.read(0, 3), head[:3])  # what is still there reads as before
    with pytest.raises(
        TrainingFault,
        match=f"the shard {ds.bin_path} is 6 bytes now, but its index describes "
        f"{ds.num_bytes}: it was truncated during the run",
    ):
        ds.read(0, 8)


# -- prepare: idempotent, atomic, bad input -----------------------------------------------------
def test_prepare_is_idempotent_and_atomic(tmp_path: Path) -> None:
    raw = _corpus(tmp_path / "raw", 10)
    out = tmp_path / "out"
    first = prepare(collect_sources([raw]), out, workers=1, quiet=True)
    stamp = (out / "meta.json").stat().st_mtime_ns
    again = prepare(collect_sources([raw]), out, workers=1, quiet=True)
    assert again.reused and (out / "meta.json").stat().st_mtime_ns == stamp
    assert (again.documents, again.tokens) == (first.documents, first.tokens) == (10, first.tokens)
    # a leftover from an interrupted run is never mistaken for a dataset, and is cleared
    (tmp_path / "out2.partial-dead").mkdir()
    (tmp_path / "out2.partial-dead" / "train").mkdir()
    with pytest.raises(ConfigError, match="not prepared|does not exist"):
        PretrainDataModule(path=str(tmp_path / "out2"))
    prepare(collect_sources([raw]), tmp_path / "out2", workers=1, quiet=True)
    assert not list(tmp_path.glob("out2.partial-*"))
    # changed input: refuses to overwrite silently
    (raw / "doc000.txt").write_text("changed")
    with pytest.raises(ConfigError, match="already holds a different dataset"):
        prepare(collect_sources([raw]), out, workers=1, quiet=True)


def test_parallel_prepare_writes_the_same_bytes(tmp_path: Path) -> None:
    raw = _corpus(tmp_path / "raw", 12)
    prepare(collect_sources([raw]), tmp_path / "one", workers=1, quiet=True)
    prepare(collect_sources([raw]), tmp_path / "two", workers=2, quiet=True)
    for split in ("train", "val"):
        for f in sorted((tmp_path / "one" / split).iterdir()):
            assert f.read_bytes() == (tmp_path / "two" / split / f.name).read_bytes()


def test_jsonl_field_and_non_utf8_policy(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "a.jsonl").write_text("\n".join(json.dumps({"text": f"row {i}", "id": i}) for i in range(5)))
    (raw / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    summary = prepare(collect_sources([raw]), tmp_path / "out", val_permille=0, workers=1, quiet=True)
    assert summary.documents == 5 and len(summary.skipped_files) == 1 and "latin1.txt" in summary.skipped_files[0]
    ds = IndexedDataset(tmp_path / "out" / "train" / "shard_00000")
    assert bytes(ds[2][:-1].astype(np.uint8)) == b"row 2"
    with pytest.raises(ConfigError, match="latin1.txt is not valid UTF-8"):
        prepare(collect_sources([raw]), tmp_path / "strict", on_decode_error="error", workers=1, quiet=True)
    assert not (tmp_path / "strict").exists() and not list(tmp_path.glob("strict.partial-*"))


def test_unreadable_file_fails_before_work() -> None:
    import os
    import shutil
    import tempfile

    # a world-traversable folder, so the check also works after dropping root privileges
    root = Path(tempfile.mkdtemp(prefix="moeframe-perm-"))
    try:
        root.chmod(0o755)
        raw = _corpus(root / "raw", 3)
        raw.chmod(0o755)
        (raw / "doc001.txt").chmod(0)
        as_root = os.geteuid() == 0
        if as_root:  # root reads anything: check as 'nobody' for real, then switch back
            os.seteuid(65534)
        try:
            with pytest.raises(ConfigError, match="cannot read 1 input file.*doc001.txt.*Permission denied"):
                collect_sources([raw])
        finally:
            if as_root:
                os.seteuid(0)
    finally:
        shutil.rmtree(root)


def test_tokenizer_mismatch_with_prepared_data(tmp_path: Path, prepared: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(
        ["lorem ipsum dolor"] * 20, trainers.BpeTrainer(vocab_size=280, special_tokens=["<unk>", "</s>"])
    )
    tok.save(str(tmp_path / "tokenizer.json"))
    dm = PretrainDataModule(path=str(prepared), tokenizer=str(tmp_path / "tokenizer.json"))
    with pytest.raises(ConfigError, match="was prepared with another tokenizer"):
        dm.setup("fit")


# -- order, shares and blends ---------------------------------------------------------------------
def test_rank_shares_are_disjoint_and_cover_the_epoch(prepared: Path) -> None:
    dm = PretrainDataModule(path=str(prepared), seq_len=8, batch_size=3)
    dm.setup("fit")
    base = dm._train
    assert base is not None
    seen = []
    for rank in range(2):
        shard = ShardedBatches(base.sources, base.weights, 1, base.seed, base.eos_id, False, True)
        shard.rank, shard.world_size = rank, 2
        seen += [tuple(map(int, x)) for x in shard.rank_samples()]
    n = len(base.sources[0])
    assert len(seen) == n and len(set(seen)) == n  # union = dataset, no duplicates


def test_blend_follows_weights_deterministically() -> None:
    order = blend_order([100, 10], [0.5, 0.5], seed=3, epoch=0)
    counts = np.bincount(order[:, 0])
    assert list(counts) == [55, 55]  # the small dataset is repeated up to its share
    assert np.array_equal(order, blend_order([100, 10], [0.5, 0.5], seed=3, epoch=0))
    assert not np.array_equal(order, blend_order([100, 10], [0.5, 0.5], seed=3, epoch=1))
    assert set(order[order[:, 0] == 1, 1]) == set(range(10))


def _run(script_args: list[str], timeout: int = 240) -> str:
    result = subprocess.run(
        [sys.executable, str(REPO / "tests" / "resume_script.py"), *script_args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=clean_env(),
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout + result.stderr


def _seen(path: Path, rank: int) -> list[list]:
    return json.loads(Path(f"{path}.rank{rank}.json").read_text())["seen"]


@pytest.mark.slow
@pytest.mark.parametrize(("devices", "workers"), [(1, 2), (2, 1)])
def test_resume_mid_epoch_sees_exactly_the_uninterrupted_batches(tmp_path: Path, devices: int, workers: int) -> None:
    prepared = tmp_path / "small"  # a few batches per epoch, so 14 steps cross epoch boundaries
    prepare(collect_sources([_corpus(tmp_path / "raw", 4)]), prepared, val_permille=0, workers=1, quiet=True)
    total, cut = 14, 6
    # the uninterrupted run leaves a checkpoint after step 6, as a preempted run would
    _run([str(prepared), str(tmp_path / "full"), str(total), str(devices), str(workers), "-", str(cut), str(tmp_path)])
    out = _run(
        [
            str(prepared),
            str(tmp_path / "resumed"),
            str(total),
            str(devices),
            str(workers),
            str(tmp_path / f"step{cut}.ckpt"),
        ]
    )
    # Lightning's "dataloader is not resumable" warning would contradict the exact resume checked below
    assert "not resumable" not in out, out[-3000:]
    for rank in range(devices):
        full = _seen(tmp_path / "full", rank)
        resumed = _seen(tmp_path / "resumed", rank)
        assert len(full) == total
        assert [s for s, _ in resumed] == list(range(cut, total))  # continued, not restarted
        assert [h for _, h in resumed] == [h for _, h in full[cut:]]  # exactly the next batches
    if devices == 2:  # the ranks really read different data
        assert {h for _, h in _seen(tmp_path / "full", 0)}.isdisjoint({h for _, h in _seen(tmp_path / "full", 1)})
    # the run crossed at least one epoch boundary
    assert json.loads(Path(f"{tmp_path / 'full'}.rank0.json").read_text())["epoch"] >= 1


def test_parquet_column(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "raw").mkdir()
    pq.write_table(
        pa.table({"content": [f"parquet row {i}" for i in range(6)], "n": list(range(6))}),
        tmp_path / "raw" / "rows.parquet",
    )
    summary = prepare(
        collect_sources([tmp_path / "raw"]),
        tmp_path / "out",
        field_name="content",
        val_permille=0,
        workers=1,
        quiet=True,
    )
    assert summary.documents == 6
    ds = IndexedDataset(tmp_path / "out" / "train" / "shard_00000")
    assert bytes(ds[4][:-1].astype(np.uint8)) == b"parquet row 4" and ds[4][-1] == 256


def test_prepare_command_prints_a_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from moeframe.cli import main

    raw = _corpus(tmp_path / "raw", 6)
    assert main(["prepare", str(raw), "-o", str(tmp_path / "out"), "--workers", "1"]) == 0
    line = capsys.readouterr().out
    assert "prepared" in line and "6 documents" in line and "tokens/s" in line
    assert main(["prepare", str(raw), "-o", str(tmp_path / "out"), "--workers", "1"]) == 0
    assert "already prepared" in capsys.readouterr().out
    assert main(["prepare", str(tmp_path / "nothing"), "-o", str(tmp_path / "o2")]) == 2
    assert "does not exist" in capsys.readouterr().err
