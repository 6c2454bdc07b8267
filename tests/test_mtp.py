"""Multi-token prediction: shapes, the target shift, the loss, λ schedule, HF layer mapping."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from moeframe.config import OptimConfig
from moeframe.convert import from_hf, to_hf
from moeframe.model.decoder import build_decoder
from moeframe.testing import tiny_config
from moeframe.training.pretrain import PretrainModule, lambda_at, mtp_loss

from .test_convert import _hf_v3, _tensors


def _decoder(depth: int = 1):
    torch.manual_seed(0)
    return build_decoder(tiny_config(mtp_depth=depth, init_std=0.2)).eval()


def test_mtp_outputs_one_shorter_sequence_per_depth() -> None:
    decoder = _decoder(depth=2)
    out = decoder(torch.randint(0, 64, (2, 10)), mtp=True)
    assert [tuple(t.shape) for t in out.mtp_logits] == [(2, 9, 64), (2, 8, 64)]
    assert decoder(torch.randint(0, 64, (2, 10))).mtp_logits == []  # inference leaves MTP out


def test_mtp_targets_are_shifted_by_exactly_one_extra_token() -> None:
    decoder = _decoder()
    window = torch.randint(0, 64, (2, 13))
    ids, labels = window[:, :-1], window[:, 1:]
    with torch.no_grad():
        out = decoder(ids, mtp=True)
    # depth 1, position i predicts token i + 2 of the window
    expected = F.cross_entropy(out.mtp_logits[0].flatten(0, 1), window[:, 2:].flatten())
    assert torch.allclose(mtp_loss(out.mtp_logits, labels), expected)
    # ... from the main model's hidden state at i and the embedding of token i + 1
    i = 5
    changed = ids.clone()
    changed[:, i + 1] = (changed[:, i + 1] + 1) % 64
    with torch.no_grad():
        after = decoder(changed, mtp=True).mtp_logits[0]
    assert torch.allclose(after[:, :i], out.mtp_logits[0][:, :i], atol=1e-6)  # causal
    assert not torch.allclose(after[:, i], out.mtp_logits[0][:, i])  # token i+1 feeds position i


def test_training_loss_includes_the_mtp_term_with_scheduled_lambda() -> None:
    module = PretrainModule(
        tiny_config(mtp_depth=1, init_std=0.2), OptimConfig(), mtp_lambda=0.3, mtp_lambda_schedule=[[5, 0.1]]
    )
    module.configure_model()
    window = torch.randint(0, 64, (2, 9))
    batch = {"input_ids": window[:, :-1], "labels": window[:, 1:]}
    torch.manual_seed(1)
    loss = module.training_step(batch, 0)
    with torch.no_grad():
        out = module.decoder(batch["input_ids"], mtp=True)
    ce = F.cross_entropy(out.logits.flatten(0, 1), window[:, 1:].flatten())
    mtp = F.cross_entropy(out.mtp_logits[0].flatten(0, 1), window[:, 2:].flatten())
    assert torch.allclose(loss, ce + 0.3 * mtp + out.aux_loss, atol=1e-5)
    assert module.current_mtp_lambda() == 0.3  # step 0


def test_lambda_schedule_breakpoints() -> None:
    schedule = [[100, 0.1], [200, 0.0]]
    assert [lambda_at(s, 0.3, schedule) for s in (0, 99, 100, 199, 200, 10_000)] == [0.3, 0.3, 0.1, 0.1, 0.0, 0.0]
    with pytest.raises(ValueError, match="increasing steps"):
        PretrainModule(tiny_config(mtp_depth=1), mtp_lambda_schedule=[[200, 0.1], [100, 0.0]])


def test_v3_mtp_module_size_matches_the_reference(capsys: pytest.CaptureFixture[str]) -> None:
    from moeframe.cli import main

    from .conftest import REPO

    assert main(["inspect", str(REPO / "configs/model/v3-671b.yaml"), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["parameters"]["mtp"] == 11_610_067_968 and r["total"] == 671_026_404_352


def _add_mtp_layer(folder: Path, n_layers: int) -> dict[str, torch.Tensor]:
    """Append an MTP layer (HF layer n_layers) in the released layout to a saved checkpoint."""
    tensors = _tensors(folder)
    g = torch.Generator().manual_seed(3)
    mtp: dict[str, torch.Tensor] = {}
    src = f"model.layers.{n_layers - 1}."
    for key, value in tensors.items():
        if key.startswith(src):  # a full MoE block, distinct values
            mtp[f"model.layers.{n_layers}." + key[len(src) :]] = value + 0.01 * torch.randn(value.shape, generator=g)
    D = tensors["model.norm.weight"].shape[0]
    for name, shape in (
        ("enorm.weight", (D,)),
        ("hnorm.weight", (D,)),
        ("eh_proj.weight", (D, 2 * D)),
        ("shared_head.norm.weight", (D,)),
    ):
        mtp[f"model.layers.{n_layers}.{name}"] = torch.randn(shape, generator=g)
    mtp[f"model.layers.{n_layers}.embed_tokens.weight"] = tensors["model.embed_tokens.weight"].clone()
    mtp[f"model.layers.{n_layers}.shared_head.head.weight"] = tensors["lm_head.weight"].clone()
    for f in folder.glob("*.safetensors"):
        f.unlink()
    save_file({**tensors, **mtp}, str(folder / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((folder / "config.json").read_text())
    cfg["num_nextn_predict_layers"] = 1
    (folder / "config.json").write_text(json.dumps(cfg))
    return mtp


def test_hf_mtp_layer_maps_to_moeframe_and_back(tmp_path: Path) -> None:
    _hf_v3(tmp_path / "hf", q_lora_rank=16)
    mtp = _add_mtp_layer(tmp_path / "hf", n_layers=3)
    decoder = from_hf(tmp_path / "hf", progress=False)
    assert decoder.config.mtp_depth == 1
    assert torch.equal(decoder.mtp[0].eh_proj.weight, mtp["model.layers.3.eh_proj.weight"])
    assert torch.equal(decoder.mtp[0].norm.weight, mtp["model.layers.3.shared_head.norm.weight"])
    assert torch.equal(decoder.mtp[0].block.ffn.experts.w2[5], mtp["model.layers.3.mlp.experts.5.down_proj.weight"])
    to_hf(decoder, tmp_path / "back", dtype=torch.float32, progress=False)
    original, back = _tensors(tmp_path / "hf"), _tensors(tmp_path / "back")
    assert set(back) == set(original)
    assert all(torch.equal(back[k], v) for k, v in original.items())
    # dropped on request, both ways
    lean = from_hf(tmp_path / "hf", progress=False, mtp=False)
    assert lean.config.mtp_depth == 0 and len(lean.mtp) == 0
    to_hf(decoder, tmp_path / "nomtp", dtype=torch.float32, progress=False, mtp=False)
    assert not any(
        k.startswith("model.layers.3.") for k in load_file(str(next((tmp_path / "nomtp").glob("*.safetensors"))))
    )
    assert json.loads((tmp_path / "nomtp" / "config.json").read_text())["num_nextn_predict_layers"] == 0
