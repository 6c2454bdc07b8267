"""Data: the embedded default corpus, user text, HF tokenizers, and the LR schedules."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moeframe.config import ConfigError, OptimConfig
from moeframe.data.corpus import stdlib_documents, stdlib_root
from moeframe.data.text import TextDataModule
from moeframe.data.tokenizer import ByteTokenizer, load_tokenizer
from moeframe.training.optim import lr_multiplier, param_groups


def _setup(dm: TextDataModule) -> TextDataModule:
    dm.setup("fit")
    return dm


def test_default_corpus_is_the_stdlib_in_a_fixed_order_with_a_fixed_split() -> None:
    docs = list(stdlib_documents(max_bytes=300_000))
    names = [d.name for d in docs]
    assert names == sorted(names) and names[0].endswith(".py")
    assert docs[0].data == (stdlib_root() / names[0]).read_bytes()
    a = _setup(TextDataModule(max_bytes=300_000, seq_len=64))
    b = _setup(TextDataModule(max_bytes=300_000, seq_len=64))
    assert a.train_tokens is not None and a.val_tokens is not None
    assert (a.train_tokens == b.train_tokens).all() and (a.val_tokens == b.val_tokens).all()
    assert len(a.val_tokens) > 65 and len(a.train_tokens) > 65
    # every document lands in exactly one split: nothing lost, nothing duplicated
    assert len(a.train_tokens) + len(a.val_tokens) == sum(len(d.data) + 1 for d in docs)
    # byte tokens: the train stream is the bytes of its documents with EOS between them
    eos = ByteTokenizer.eos_id
    first_doc = a.train_tokens[: list(a.train_tokens).index(eos)]
    assert bytes(first_doc.astype("uint8")) in {d.data for d in docs}


def test_batches_are_shifted_windows() -> None:
    dm = _setup(TextDataModule(max_bytes=200_000, seq_len=32, batch_size=4))
    batch = next(iter(dm.val_dataloader()))
    assert batch["input_ids"].shape == (4, 32)
    assert torch.equal(batch["input_ids"][0, 1:], batch["labels"][0, :-1])
    assert torch.equal(batch["labels"][0, -1], batch["input_ids"][1, 0])  # windows tile the stream


def test_document_ids_follow_eos() -> None:
    dm = TextDataModule(max_bytes=200_000, seq_len=16, batch_size=1, document_masking=True)
    ids = torch.tensor([5, 6, 256, 7, 8, 256, 9] + [1] * 10, dtype=torch.int32).numpy()
    from moeframe.data.text import TokenWindows
    item = TokenWindows(ids, 16, dm.tokenizer.eos_id, True)[0]
    assert item["document_ids"][:8].tolist() == [0, 0, 0, 1, 1, 1, 2, 2]


def test_user_file_and_folder(tmp_path: Path) -> None:
    text = "the quick brown fox jumps over the lazy dog. " * 200
    (tmp_path / "one.txt").write_text(text)
    dm = _setup(TextDataModule(path=str(tmp_path / "one.txt"), seq_len=32))
    assert len(dm.train_tokens) + len(dm.val_tokens) == len(text.encode()) + 1  # + EOS
    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    for i in range(30):
        (folder / "sub" / f"doc{i:02d}.md").write_text(f"document {i}: " + text[: 100 + i])
    (folder / ".hidden").write_text("never read")
    (folder / "blob.bin").write_bytes(b"\0\1\2" * 100)
    dm = _setup(TextDataModule(path=str(folder), seq_len=16))
    stream = bytes(t for t in list(dm.train_tokens) + list(dm.val_tokens) if t < 256)
    assert b"document 7: " in stream and b"never read" not in stream and b"\0\1\2" not in stream


def test_missing_path_and_empty_folder_fail_clearly(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        TextDataModule(path=str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="contains no text files"):
        TextDataModule(path=str(tmp_path / "empty"))


def test_too_little_data_fails_clearly(tmp_path: Path) -> None:
    (tmp_path / "short.txt").write_text("tiny")
    with pytest.raises(ConfigError, match="too few for a train and a validation split"):
        _setup(TextDataModule(path=str(tmp_path / "short.txt"), seq_len=64))


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
    dm = _setup(TextDataModule(path=str(tmp_path / "code.py"), tokenizer=str(tmp_path / "tokenizer.json"), seq_len=16))
    assert dm.vocab_size == tok.vocab_size
    assert int(dm.train_tokens.max()) < tok.vocab_size
    assert len(dm.train_tokens) < len((tmp_path / "code.py").read_bytes())  # BPE merges, not bytes


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
