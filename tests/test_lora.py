"""LoRA: adapters start at the base model, only adapters train, and the merged export computes
the same logits as the adapter model (through load_moeframe and through the HF export)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch

from moeframe.cli import main
from moeframe.convert.hf import from_hf, load_moeframe
from moeframe.model.decoder import build_decoder
from moeframe.model.lora import LoRAGroupedExperts, LoRALinear, LoRAOptions, apply_lora, merge_lora
from moeframe.training.finetune import FinetuneModule

from .test_finetune_helpers import hf_folder, optim, small_data, tiny_config

IDS = torch.tensor([[3, 70, 101, 33, 256, 7, 9, 120, 65, 66, 67, 68]])


def _randomise_adapters(decoder: torch.nn.Module) -> None:
    with torch.no_grad():
        for name, p in decoder.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)  # B starts at zero; a trained one is not


def test_adapters_start_as_the_base_model_and_cover_attention_and_every_expert() -> None:
    torch.manual_seed(0)
    decoder = build_decoder(tiny_config()).eval()
    base = decoder(IDS).logits
    adapted = apply_lora(decoder, LoRAOptions(rank=4))
    assert sum(isinstance(m, LoRAGroupedExperts) for m in decoder.modules()) == 2  # two MoE layers
    assert sum(isinstance(m, LoRALinear) for m in decoder.modules()) == 3 * 4  # wq, wk, wv, wo per layer
    assert len(adapted) == 14
    torch.testing.assert_close(decoder(IDS).logits, base, atol=0, rtol=0)
    assert {n.rsplit(".", 1)[-1] for n, p in decoder.named_parameters() if p.requires_grad} == {
        "lora_A",
        "lora_B",
        "w1_lora_A",
        "w1_lora_B",
        "w2_lora_A",
        "w2_lora_B",
        "w3_lora_A",
        "w3_lora_B",
    }


def test_merging_keeps_the_logits_and_the_parameter_names() -> None:
    torch.manual_seed(0)
    decoder = build_decoder(tiny_config()).eval()
    names = set(decoder.state_dict())
    apply_lora(decoder, LoRAOptions(rank=4, shared_experts=True))
    _randomise_adapters(decoder)
    with torch.no_grad():
        adapter = decoder(IDS).logits
        merge_lora(decoder)
        merged = decoder(IDS).logits
    assert (adapter - merged).abs().max() <= 1e-5
    assert set(decoder.state_dict()) == names


def test_per_expert_adapters_change_only_their_expert() -> None:
    torch.manual_seed(0)
    decoder = build_decoder(tiny_config())
    apply_lora(decoder, LoRAOptions(rank=4, attention=False))
    experts = decoder.layers[1].ffn.experts
    w_before = experts.base.w1.detach().clone()
    with torch.no_grad():
        experts.w1_lora_B[2].normal_()
    merge_lora(decoder)
    merged = decoder.layers[1].ffn.experts.w1
    assert torch.equal(merged[[0, 1, 3]], w_before[[0, 1, 3]]) and not torch.equal(merged[2], w_before[2])


def test_trained_lora_checkpoint_exports_merged_with_identical_logits(tmp_path: Path) -> None:
    folder = hf_folder(tmp_path / "pre")  # MLA attention and the aux_free router: what HF export expects
    module = FinetuneModule(init_from=str(folder), method="lora", lora=LoRAOptions(rank=4), optim=optim(3e-2))
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=3,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=str(tmp_path),
    )
    base = from_hf(folder, progress=False).eval()
    base_before = {k: v.clone() for k, v in base.state_dict().items()}
    trainer.fit(module, datamodule=small_data())
    ckpt = tmp_path / "ft.ckpt"
    trainer.save_checkpoint(ckpt)
    # only the adapters trained: every pretrained tensor is bit for bit what it was
    frozen = {k.replace(".base.", "."): v for k, v in module.decoder.state_dict().items() if "lora_" not in k}
    assert all(torch.equal(frozen[k], v) for k, v in base_before.items())
    module.decoder.eval()
    with torch.no_grad():
        adapter_logits = module.decoder(IDS).logits
        assert (adapter_logits - base(IDS).logits).abs().max() > 1e-3  # the adapters learned something
        merged = load_moeframe(ckpt).eval()
        assert not any("lora" in k for k in merged.state_dict())
        assert (merged(IDS).logits - adapter_logits).abs().max() <= 1e-5
        assert main(["convert", str(ckpt), str(tmp_path / "hf"), "--dtype", "float32"]) == 0
        exported = from_hf(tmp_path / "hf", progress=False).eval()
        assert (exported(IDS).logits - adapter_logits).abs().max() <= 1e-5


def test_bf16_cpu_lora_experts_pad_like_the_base_and_start_equal_to_it(monkeypatch) -> None:
    """On the CPU in bf16 the LoRA experts pad each expert's rows as ``GroupedExperts`` does (same
    GEMM shapes, same results): at B = 0 they give the base layer's output bit for bit, and with
    trained adapters they match the unpadded computation."""
    from moeframe.model.experts import GroupedExperts, GroupedOptions

    torch.manual_seed(0)
    E, D, F_, T = 8, 32, 16, 40
    base = GroupedExperts(tiny_config(dim=D, n_heads=2), GroupedOptions(), E, D, F_)
    for p in base.parameters():
        torch.nn.init.normal_(p, std=0.2)
    base.bfloat16()
    x = torch.randn(T, D, dtype=torch.bfloat16)
    indices = torch.stack([torch.randperm(E)[:2] for _ in range(T)])
    weights = torch.rand(T, 2)
    y_base = base(x, weights, indices)
    lora = LoRAGroupedExperts(base, rank=8, scale=2.0)
    import torch.nn.functional as F

    seen: list[torch.Tensor] = []
    real = F.grouped_mm
    monkeypatch.setattr(F, "grouped_mm", lambda a, b, offs=None, **kw: seen.append(offs) or real(a, b, offs=offs, **kw))
    assert torch.equal(lora(x, weights, indices), y_base)
    monkeypatch.setattr(F, "grouped_mm", real)
    assert len(seen) == 9 and all(
        bool((torch.diff(o.long(), prepend=o.new_zeros(1).long()) % 32 == 0).all()) for o in seen
    )  # base + A + B for w1, w3, w2: whole multiples of 32
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    padded = lora(x, weights, indices)
    base.cpu_bf16_group_multiple = 0
    torch.testing.assert_close(padded, lora(x, weights, indices))
