"""SFT data: prompt masking, packing with document masking, bad input, the embedded task."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from moeframe.cli import main
from moeframe.config import ModelConfig
from moeframe.data.sft import IGNORE, SFTDataModule, pack, render
from moeframe.data.tasks import word_task
from moeframe.data.tokenizer import ByteTokenizer
from moeframe.errors import ConfigError
from moeframe.model.decoder import build_decoder

from .conftest import REPO


def write_jsonl(path: Path, records: list, raw_lines: tuple[str, ...] = ()) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + "".join(raw_lines))
    return path


def test_only_the_response_and_its_eos_carry_labels() -> None:
    ex = render(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}],
        SFTDataModule().template,
        ByteTokenizer(),
    )
    inputs, labels = ex.shifted()
    assert [t for t in labels if t != IGNORE] == [ord("o"), ord("k"), 256]
    assert ByteTokenizer().decode(ex.tokens[: ex.prompt_len]) == "Q: hi\nA: "
    assert len(inputs) == len(labels) == len(ex.tokens) - 1


def test_a_packed_row_computes_what_each_example_computes_alone() -> None:
    torch.manual_seed(0)
    decoder = build_decoder(
        ModelConfig(vocab_size=300, dim=32, n_layers=2, n_heads=2, dense_ffn_dim=64, moe_ffn_dim=16, max_seq_len=128)
    ).eval()
    tok, template = ByteTokenizer(), SFTDataModule().template
    examples = [
        render([{"role": "user", "content": p}, {"role": "assistant", "content": r}], template, tok)
        for p, r in [("abc", "ABC"), ("reverse xy", "yx"), ("q", "long answer")]
    ]
    (row,) = pack(examples, seq_len=100, pad_id=256, packing=True)
    assert row["document_ids"].unique().tolist() == [0, 1, 2, 3]  # three examples and the padding
    with torch.no_grad():
        packed = decoder(row["input_ids"][None], row["document_ids"][None]).logits[0]
        start = 0
        for ex in examples:
            alone = decoder(torch.tensor([ex.tokens[:-1]])).logits[0]
            torch.testing.assert_close(packed[start : start + len(alone)], alone, atol=1e-5, rtol=1e-5)
            start += len(alone)
    # no example is asked to predict its neighbour's first token
    boundary = len(examples[0].tokens) - 2
    assert row["labels"][boundary] == 256 and row["document_ids"][boundary + 1] == 1


def test_without_packing_each_example_has_its_own_row() -> None:
    dm = SFTDataModule(task_num_train=10, task_num_val=4, packing=False, batch_size=4)
    assert len(pack(dm.train_examples, dm.seq_len, 256, packing=False)) == 10


def test_malformed_jsonl_names_file_and_line_and_stops_before_training(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = {"prompt": "a", "response": "b"}
    train = write_jsonl(tmp_path / "train.jsonl", [good, good], raw_lines=('{"prompt": "a", "respo\n',))
    val = write_jsonl(tmp_path / "val.jsonl", [good])
    code = main(
        [
            "fit",
            "-c",
            str(REPO / "configs/finetune/tiny.yaml"),
            "--trainer.default_root_dir",
            str(tmp_path),
            "--data.init_args.train_path",
            str(train),
            "--data.init_args.val_path",
            str(val),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert f"{train}:3: not valid JSON" in err and "Traceback" not in err
    assert not list(tmp_path.rglob("*.ckpt"))


@pytest.mark.parametrize(
    "record",
    [
        {"prompt": "no answer"},
        {"prompt": "x", "response": ""},
        {"messages": [{"role": "user", "content": "only a question"}]},
    ],
)
def test_an_example_without_a_response_is_refused(tmp_path: Path, record: dict) -> None:
    train = write_jsonl(tmp_path / "t.jsonl", [{"prompt": "a", "response": "b"}, record])
    with pytest.raises(ConfigError, match=r"t\.jsonl:2: the example has no .*assistant response"):
        SFTDataModule(train_path=str(train), val_path=str(train))


def test_overlong_examples_are_truncated_with_a_count_or_rejected(tmp_path: Path) -> None:
    records = [
        {"prompt": "p", "response": "r" * 100},
        {"prompt": "p", "response": "s"},
        {"prompt": "p", "response": "t" * 80},
    ]
    path = write_jsonl(tmp_path / "long.jsonl", records)
    with pytest.warns(UserWarning, match="2 of 3 examples were longer than data.seq_len=40"):
        dm = SFTDataModule(train_path=str(path), val_path=str(path), seq_len=40, overlong="truncate")
    assert [len(e.tokens) for e in dm.train_examples] == [41, len(b"Q: p\nA: s") + 1, 41]
    with pytest.raises(ConfigError, match=r"long\.jsonl:1: the example has 109 tokens"):
        SFTDataModule(train_path=str(path), val_path=str(path), seq_len=40, overlong="reject")


def test_multi_turn_conversations_label_every_assistant_turn(tmp_path: Path) -> None:
    messages = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "u1"},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "u2"},
        {"role": "assistant", "content": "a2"},
    ]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": messages}])
    (ex,) = SFTDataModule(train_path=str(path), val_path=str(path)).train_examples
    _, labels = ex.shifted()
    assert ByteTokenizer().decode([t for t in labels if t != IGNORE]) == "a1a2"
    assert ex.response == "a1"


def test_the_embedded_task_has_a_fixed_disjoint_held_out_split() -> None:
    train, val = word_task(num_train=500, num_val=50)
    _, val_again = word_task(num_train=20, num_val=50)
    assert val == val_again  # the held-out split does not depend on the training size
    words = lambda rows: {r["prompt"].split("'")[1] for r in rows}  # noqa: E731
    assert not words(train) & words(val)
    upper = [r for r in val if "capital" in r["prompt"]]
    backwards = [r for r in val if "backwards" in r["prompt"]]
    assert upper and all(r["response"] == r["prompt"].split("'")[1].upper() for r in upper)
    assert backwards and all(r["response"] == r["prompt"].split("'")[1][::-1] for r in backwards)
