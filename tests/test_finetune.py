"""FinetuneModule: HF start through the CLI, shape mismatches, router bias, exact-match metric."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moeframe.cli import main
from moeframe.training.finetune import FinetuneModule, example_exact_match

from .conftest import REPO, clean_env
from .test_finetune_helpers import fit, hf_folder, optim, pretrained_folder, small_data

FAST = [
    "--data.init_args.task_num_train",
    "48",
    "--data.init_args.task_num_val",
    "8",
    "--data.init_args.seq_len",
    "64",
    "--data.init_args.batch_size",
    "4",
    "--trainer.limit_val_batches",
    "1",
    "--trainer.val_check_interval",
    "3",
    "--model.init_args.max_new_tokens",
    "4",
    "--model.init_args.num_samples",
    "1",
]


def test_exact_match_needs_every_answer_token_of_an_example() -> None:
    labels = torch.tensor([[-100, 5, 6, -100, -100, 7, -100], [-100, 8, -100, -100, -100, -100, -100]])
    docs = torch.tensor([[0, 0, 0, 1, 1, 1, 2], [0, 0, 1, 1, 1, 1, 1]])
    pred = torch.tensor([[0, 5, 6, 0, 0, 9, 0], [0, 8, 0, 0, 0, 0, 0]])
    assert example_exact_match(pred, labels, docs).tolist() == [1.0, 0.0, 1.0]  # row 0 doc 0, doc 1; row 1


@pytest.mark.slow
def test_finetune_from_an_hf_folder_end_to_end_through_the_cli(tmp_path: Path) -> None:
    hf = hf_folder(tmp_path / "hf")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "moeframe.cli",
            "fit",
            "-c",
            str(REPO / "configs/finetune/tiny-esft.yaml"),
            "--model.init_args.init_from",
            str(hf),
            "--model.init_args.config",
            "null",
            "--trainer.max_steps",
            "3",
            "--trainer.default_root_dir",
            str(tmp_path / "run"),
            *FAST,
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env=clean_env(),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "run/logs/version_0"
    selection = json.loads((run / "esft_selection.json").read_text())
    assert set(selection["layers"]) == {"layers.1.ffn", "layers.2.ffn"}
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    em = [float(r["val/exact_match"]) for r in rows if r.get("val/exact_match")]
    assert len(em) == 2 and all(0.0 <= v <= 1.0 for v in em)  # before training, then after step 3
    assert any(r.get("balance/maxvio_global") for r in rows)  # expert load is logged
    samples = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert samples and samples[0]["prompt"].startswith("Q: Write '")
    assert torch.load(run / "checkpoints/last.ckpt", weights_only=True)["global_step"] == 3


def test_a_checkpoint_of_another_shape_is_one_clear_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = pretrained_folder(tmp_path / "pre")  # dim 32, the config says 128
    code = main(
        [
            "fit",
            "-c",
            str(REPO / "configs/finetune/tiny.yaml"),
            "--model.init_args.init_from",
            str(folder),
            "--trainer.default_root_dir",
            str(tmp_path),
            "--trainer.max_steps",
            "2",
            *FAST,
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert (
        "does not match model.config (vocab_size: checkpoint 260 vs config 512; dim: checkpoint 32 vs config 128" in err
    )
    assert "Traceback" not in err and not list(tmp_path.rglob("*.ckpt"))


def test_a_missing_init_checkpoint_is_one_clear_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        [
            "fit",
            "-c",
            str(REPO / "configs/finetune/tiny.yaml"),
            "--model.init_args.init_from",
            str(tmp_path / "nope.ckpt"),
            "--trainer.default_root_dir",
            str(tmp_path),
            *FAST,
        ]
    )
    assert code == 2 and "nope.ckpt' does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("router_bias", ["frozen", "updated"])
def test_the_router_bias_is_frozen_unless_asked(router_bias: str, tmp_path: Path) -> None:
    hf = hf_folder(tmp_path / "hf")
    module = FinetuneModule(init_from=str(hf), router_bias=router_bias, optim=optim(1e-3))
    module.configure_model()
    bias = lambda: torch.cat([m.gate.e_score_correction_bias.clone() for _, m in module.decoder.moe_layers()])  # noqa: E731
    before = bias()
    fit(module, small_data(), tmp_path, steps=2)
    assert torch.equal(bias(), before) == (router_bias == "frozen")


def test_full_finetuning_starts_from_the_checkpoint_weights(tmp_path: Path) -> None:
    from moeframe.convert.hf import load_moeframe

    folder = pretrained_folder(tmp_path / "pre", seed=3)
    module = FinetuneModule(init_from=str(folder), optim=optim())
    module.configure_model()
    reference = load_moeframe(folder).state_dict()
    assert all(torch.equal(v, reference[k]) for k, v in module.decoder.state_dict().items())
    assert all(p.requires_grad for p in module.decoder.parameters())


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_runtime_applies_to_finetuning_after_the_adapters(mode: str) -> None:
    """``model.runtime`` works for fine-tuning as for pretraining: LoRA adapters are in place first,
    so the checkpointed blocks recompute them too; loss and every gradient are unchanged."""
    from moeframe.config import RuntimeConfig
    from moeframe.model.lora import LoRALinear
    from moeframe.testing import tiny_config

    def loss_and_grads(runtime: RuntimeConfig) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        torch.manual_seed(0)
        module = FinetuneModule(config=tiny_config(), method="lora", runtime=runtime)
        module.configure_model()
        with torch.no_grad():  # non-zero adapters, so their gradients are not trivially equal
            for n, p in module.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.02)
        ids = torch.randint(0, module.config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(1))
        loss = torch.nn.functional.cross_entropy(module(ids[:, :-1]).logits.flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        assert any(isinstance(m, LoRALinear) for m in module.modules())
        return loss.detach(), {n: p.grad for n, p in module.named_parameters() if p.requires_grad}

    loss_ref, grads_ref = loss_and_grads(RuntimeConfig())
    loss, grads = loss_and_grads(RuntimeConfig(activation_checkpointing=mode))
    module = FinetuneModule(config=tiny_config(), method="lora", runtime=RuntimeConfig(activation_checkpointing=mode))
    module.configure_model()
    assert {b.checkpointing for b in module.decoder.blocks()} == {mode}
    assert torch.equal(loss, loss_ref) and grads.keys() == grads_ref.keys()
    for n, g in grads.items():
        assert torch.equal(g, grads_ref[n]), n
