"""The default data path: embedded corpus, user text, HF tokenizers; and the LR schedules."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from moeframe.config import ConfigError, OptimConfig
from moeframe.data.corpus import stdlib_files, stdlib_root
from moeframe.data.prepare import stdlib_sources
from moeframe.data.shards import PretrainDataModule
from moeframe.data.tokenizer import load_tokenizer
from moeframe.training.optim import lr_multiplier, param_groups


def _setup(dm: PretrainDataModule) -> PretrainDataModule:
    dm.prepare_data()
    dm.setup("fit")
    return dm


def _stream(dm: PretrainDataModule, split: str) -> np.ndarray:
    ds = dm._train if split == "train" else dm._val
    assert ds is not None
    return np.concatenate([np.asarray(sh.tokens) for src in ds.sources for sh in src.shards])


def test_default_corpus_is_the_stdlib_in_a_fixed_order_with_a_fixed_split() -> None:
    sources = stdlib_sources(max_bytes=300_000)
    names = [s.name for s in sources]
    assert names == sorted(names) and names[0].endswith(".py")
    assert names == [p.relative_to(stdlib_root()).as_posix() for p in stdlib_files(stdlib_root())][: len(names)]
    a = _setup(PretrainDataModule(max_bytes=300_000, seq_len=64))
    b = _setup(PretrainDataModule(max_bytes=300_000, seq_len=64))
    train, val = _stream(a, "train"), _stream(a, "val")
    assert np.array_equal(train, _stream(b, "train")) and np.array_equal(val, _stream(b, "val"))
    assert len(val) > 65 and len(train) > 65
    # every document lands in exactly one split (bytes + EOS): nothing lost, nothing duplicated
    assert len(train) + len(val) == sum(s.path.stat().st_size + 1 for s in sources)
    first_doc = bytes(train[: int(np.argmax(train == 256))].astype(np.uint8))
    assert first_doc in {s.path.read_bytes() for s in sources}


def test_batches_are_shifted_windows() -> None:
    dm = _setup(PretrainDataModule(max_bytes=200_000, seq_len=32, batch_size=4))
    batch = next(iter(dm.val_dataloader()))
    assert batch["input_ids"].shape == (4, 32)
    assert torch.equal(batch["input_ids"][0, 1:], batch["labels"][0, :-1])
    assert torch.equal(batch["labels"][0, -1], batch["input_ids"][1, 0])  # windows tile the stream


def test_document_ids_follow_eos(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("ab")
    (tmp_path / "b.txt").write_text("cd")
    (tmp_path / "c.txt").write_text("e" * 40)
    dm = _setup(PretrainDataModule(path=str(tmp_path), seq_len=16, batch_size=1, val_permille=0, document_masking=True))
    n_eos = 0
    for batch in dm.train_dataloader():
        ids, docs = batch["input_ids"][0].tolist(), batch["document_ids"][0].tolist()
        for i in range(len(ids) - 1):  # a new document starts exactly after each EOS
            assert docs[i + 1] == docs[i] + (ids[i] == 256)
        n_eos += ids.count(256)
    assert n_eos >= 2


def test_user_file_and_folder(tmp_path: Path) -> None:
    text = "the quick brown fox jumps over the lazy dog. " * 200
    (tmp_path / "one.txt").write_text(text)
    dm = _setup(PretrainDataModule(path=str(tmp_path / "one.txt"), seq_len=32, val_permille=0))
    assert len(_stream(dm, "train")) == len(text.encode()) + 1  # + EOS
    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    for i in range(30):
        (folder / "sub" / f"doc{i:02d}.md").write_text(f"document {i}: " + text[: 100 + i])
    (folder / ".hidden").write_text("never read")
    dm = _setup(PretrainDataModule(path=str(folder), seq_len=16))
    stream = bytes(int(t) for t in np.concatenate([_stream(dm, "train"), _stream(dm, "val")]) if t < 256)
    assert b"document 7: " in stream and b"never read" not in stream


def test_missing_path_and_empty_folder_fail_clearly(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        PretrainDataModule(path=str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="the folder is empty"):
        PretrainDataModule(path=str(tmp_path / "empty"))


def test_too_little_data_fails_clearly(tmp_path: Path) -> None:
    (tmp_path / "short.txt").write_text("tiny")
    with pytest.raises(ConfigError, match="fewer than data.seq_len"):
        _setup(PretrainDataModule(path=str(tmp_path / "short.txt"), seq_len=64, val_permille=0))


def _write_tokenizer_json(path: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<|endoftext|>"])
    tok.train_from_iterator(["def foo(x):\n    return x + 1\n" * 50, "class Bar:\n    pass\n" * 50], trainer)
    tok.save(str(path))


def test_hf_tokenizer_json(tmp_path: Path) -> None:
    _write_tokenizer_json(tmp_path / "tokenizer.json")
    tok = load_tokenizer(str(tmp_path))
    assert tok.eos_id == 1 and tok.vocab_size <= 300
    assert tok.decode(tok.encode("def foo(x):")) == "def foo(x):"
    (tmp_path / "code.py").write_text("def foo(x):\n    return x + 1\n" * 300)
    dm = _setup(
        PretrainDataModule(
            path=str(tmp_path / "code.py"), tokenizer=str(tmp_path / "tokenizer.json"), seq_len=16, val_permille=0
        )
    )
    assert dm.vocab_size == tok.vocab_size
    stream = _stream(dm, "train")
    assert int(stream.max()) < tok.vocab_size and stream[-1] == tok.eos_id
    assert len(stream) < len((tmp_path / "code.py").read_bytes())  # BPE merges, not bytes


def test_bad_tokenizer_path() -> None:
    with pytest.raises(ConfigError, match="neither 'byte' nor an existing tokenizer.json"):
        load_tokenizer("/no/such/tokenizer.json")


def test_cosine_schedule_breakpoints() -> None:
    opt = OptimConfig(warmup_steps=10, schedule="cosine", min_lr_ratio=0.1)
    assert lr_multiplier(0, 110, opt) == pytest.approx(0.1)
    assert lr_multiplier(9, 110, opt) == pytest.approx(1.0)
    assert lr_multiplier(10, 110, opt) == pytest.approx(1.0)
    assert lr_multiplier(60, 110, opt) == pytest.approx(0.55)  # halfway: floor + (1-floor)/2
    assert lr_multiplier(110, 110, opt) == pytest.approx(0.1)


def test_wsd_schedule_breakpoints() -> None:
    opt = OptimConfig(warmup_steps=10, schedule="wsd", min_lr_ratio=0.0, decay_fraction=0.2)
    assert lr_multiplier(50, 100, opt) == 1.0
    assert lr_multiplier(79, 100, opt) == 1.0
    assert lr_multiplier(90, 100, opt) == pytest.approx(0.5)
    assert lr_multiplier(100, 100, opt) == pytest.approx(0.0)


def test_no_weight_decay_on_norms_biases_embeddings() -> None:
    from moeframe.model.decoder import build_decoder
    from moeframe.testing import tiny_config

    decoder = build_decoder(tiny_config())
    decay, no_decay = param_groups(decoder, 0.1)
    decayed = {id(p) for p in decay["params"]}
    assert id(decoder.embed.weight) not in decayed and id(decoder.norm.weight) not in decayed
    assert id(decoder.head.weight) in decayed and id(decoder.layers[1].ffn.experts.w1) in decayed
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.1
