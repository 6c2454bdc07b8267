"""ESFT: the selection follows the routing statistics, and only the selected experts change."""

from __future__ import annotations

import json
from itertools import islice
from pathlib import Path

import torch

from moeframe.cli import main
from moeframe.model.context import ForwardContext
from moeframe.training.esft import ESFTOptions, select_experts
from moeframe.training.finetune import FinetuneModule

from .conftest import REPO
from .test_finetune_helpers import fit, optim, pretrained_folder, small_data, write_json


def test_select_experts_takes_the_fewest_covering_the_mass() -> None:
    scores = torch.tensor([0.1, 0.5, 0.3, 0.1])
    assert select_experts(scores, 0.7) == [1, 2]
    assert select_experts(scores, 0.5) == [1]
    assert select_experts(scores, 0.05) == [1]  # at least one expert
    assert sorted(select_experts(scores, 1.0)) == [0, 1, 2, 3]


def _routed_counts(folder: Path, data, num_batches: int) -> dict[str, torch.Tensor]:
    """Independent reference: re-run the routers and count the answer tokens' expert choices."""
    from moeframe.convert.hf import load_moeframe

    decoder = load_moeframe(folder).eval()
    counts = {n: torch.zeros(m.num_experts) for n, m in decoder.moe_layers()}
    for batch in islice(iter(data.train_dataloader()), num_batches):
        h = decoder.embed(batch["input_ids"])
        ctx = ForwardContext(torch.arange(h.shape[1]), batch["input_ids"], batch["document_ids"])
        answer = (batch["labels"] != -100).flatten()
        for block in decoder.layers:
            layer_ctx = ctx.for_layer(block.layer_id)
            if hasattr(block.ffn, "gate"):
                after_attn = h + block.attn(block.attn_norm(h), layer_ctx)
                routing = block.ffn.gate(block.ffn_norm(after_attn).flatten(0, 1), layer_ctx)
                name = f"layers.{block.layer_id}.ffn"
                counts[name] += torch.bincount(routing.indices_TK[answer].flatten(), minlength=len(counts[name]))
            h, _ = block(h, layer_ctx)
    return counts


def test_esft_select_command_writes_scores_that_match_the_routing(tmp_path: Path) -> None:
    folder = pretrained_folder(tmp_path / "pre")
    out = tmp_path / "sel.json"
    code = main(
        [
            "esft-select",
            "-c",
            str(REPO / "configs/finetune/tiny-esft.yaml"),
            "--out",
            str(out),
            "--model.init_args.init_from",
            str(folder),
            "--model.init_args.config",
            "null",
            "--model.init_args.esft.num_batches",
            "2",
            "--model.init_args.esft.mass_fraction",
            "0.6",
            "--data.init_args.task_num_train",
            "40",
            "--data.init_args.seq_len",
            "64",
            "--data.init_args.batch_size",
            "4",
            "--trainer.default_root_dir",
            str(tmp_path),
        ]
    )
    assert code == 0
    selection = json.loads(out.read_text())
    data = small_data(task_num_train=40)
    counts = _routed_counts(folder, data, 2)
    assert selection["num_tokens"] == sum(
        int((b["labels"] != -100).sum()) for b in islice(iter(data.train_dataloader()), 2)
    )
    for name, entry in selection["layers"].items():
        expected = counts[name] / counts[name].sum()
        torch.testing.assert_close(torch.tensor(entry["scores"], dtype=torch.float32), expected)
        chosen = entry["selected"]
        mass = sum(expected[e] for e in chosen)
        assert mass >= 0.6 - 1e-6 and mass - min(expected[e] for e in chosen) < 0.6  # none of them superfluous
        assert min(expected[e] for e in chosen) >= max(expected[e] for e in range(4) if e not in chosen)


def test_only_the_selected_experts_change(tmp_path: Path) -> None:
    folder = pretrained_folder(tmp_path / "pre")
    selection = {"layers": {"layers.1.ffn": {"selected": [0, 2]}, "layers.2.ffn": {"selected": [3]}}}
    path = write_json(tmp_path / "sel.json", selection)
    module = FinetuneModule(init_from=str(folder), method="esft", optim=optim(), esft=ESFTOptions(selection=str(path)))
    module.configure_model()
    before = {k: v.clone() for k, v in module.decoder.state_dict().items()}
    fit(module, small_data(), tmp_path, steps=3)
    after = module.decoder.state_dict()
    changed_rows = 0
    for key, old in before.items():
        new = after[key]
        layer = key.rsplit(".experts.", 1)[0] if ".experts." in key else None
        chosen = selection["layers"].get(layer, {}).get("selected", []) if layer else []
        for e in range(old.shape[0] if chosen else 0):
            if e in chosen:
                changed_rows += int(not torch.equal(old[e], new[e]))
            else:
                assert torch.equal(old[e], new[e]), f"{key}[{e}] changed"
        if not chosen:
            assert torch.equal(old, new), f"{key} changed"
    assert changed_rows == 3 * 3  # every selected expert's w1, w2 and w3 trained


def test_a_selection_for_another_model_is_refused(tmp_path: Path) -> None:
    import pytest

    from moeframe.errors import ConfigError

    folder = pretrained_folder(tmp_path / "pre")
    path = write_json(
        tmp_path / "sel.json", {"layers": {"layers.1.ffn": {"selected": [7]}, "layers.2.ffn": {"selected": [0]}}}
    )
    module = FinetuneModule(init_from=str(folder), method="esft", esft=ESFTOptions(selection=str(path)))
    with pytest.raises(ConfigError, match=r"layers.1.ffn selects \[7\]"):
        module.configure_model()
