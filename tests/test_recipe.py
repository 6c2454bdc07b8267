"""DeepSeek-V3's recipe mechanics on a tiny model: batch-size ramp, token-scheduled LR, γ and λ."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import torch

from moeframe.config import ModelConfig, OptimConfig
from moeframe.data.shards import PretrainDataModule
from moeframe.training.callbacks import BatchSizeRamp
from moeframe.training.pretrain import PretrainModule

SEQ, MICRO = 16, 2


class StepProbe(L.Callback):
    """Micro-batches per optimizer step, the accumulation in force, LR and tokens at each step."""

    def __init__(self) -> None:
        self.micro, self.steps = 0, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.micro += 1

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.steps.append(
            {
                "micro": self.micro + 1,
                "accumulate": trainer.accumulate_grad_batches,
                "lr": optimizer.param_groups[0]["lr"],
                "tokens": pl_module.tokens_seen,
            }
        )
        self.micro = -1  # on_train_batch_end of this batch comes after


def _module(**kwargs) -> PretrainModule:
    L.seed_everything(0, verbose=False)
    cfg = ModelConfig(
        vocab_size=260,
        dim=32,
        n_layers=2,
        first_k_dense=1,
        n_heads=2,
        dense_ffn_dim=64,
        moe_ffn_dim=16,
        n_routed_experts=4,
        n_activated_experts=2,
        n_shared_experts=0,
        max_seq_len=SEQ,
        mtp_depth=1,
        router={
            "name": "aux_free",
            "bias_update_speed": 0.01,
            "bias_update_schedule": [[640, 0.0]],
            "bias_update_schedule_unit": "tokens",
        },
    )
    return PretrainModule(cfg, **kwargs)


@pytest.fixture(scope="module")
def data() -> PretrainDataModule:
    dm = PretrainDataModule(seq_len=SEQ, batch_size=MICRO, max_bytes=40_000)
    dm.setup("fit")
    return dm


def test_v3_recipe_mechanics_on_a_tiny_run(tmp_path: Path, data: PretrainDataModule) -> None:
    tokens_per_micro = MICRO * SEQ  # 32
    lr = [[64, 1e-2, "linear"], [320, 1e-2, "constant"], [960, 1e-3, "cosine"]]
    module = _module(
        optim=OptimConfig(lr=1e-2, token_schedule=lr),
        mtp_lambda=0.3,
        mtp_lambda_schedule=[[480, 0.1]],
        mtp_lambda_schedule_unit="tokens",
    )
    probe = StepProbe()
    ramp = BatchSizeRamp(start_sequences=2, end_sequences=8, ramp_tokens=20 * tokens_per_micro)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=14,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=tmp_path,
        callbacks=[ramp, probe],
    )
    trainer.fit(module, datamodule=data)
    steps = probe.steps
    # the ramp: accumulation grows 1 -> 4 and every step averages exactly the micro-batches it was set for
    assert steps[0]["accumulate"] == 1 and steps[-1]["accumulate"] == 4
    assert all(a["accumulate"] <= b["accumulate"] for a, b in zip(steps, steps[1:]))
    assert all(s["micro"] == s["accumulate"] for s in steps)
    # tokens are counted per micro-batch
    assert steps[-1]["tokens"] == tokens_per_micro * sum(s["micro"] for s in steps)
    # LR follows the token schedule: warm-up over the first 64 tokens, plateau, then cosine
    for s in steps:
        tokens_before = s["tokens"] - s["micro"] * tokens_per_micro  # the scheduler last stepped here
        if 64 <= tokens_before < 320:
            assert s["lr"] == pytest.approx(1e-2)
        if tokens_before >= 960:
            assert s["lr"] == pytest.approx(1e-3)
    assert any(s["lr"] < 1e-2 for s in steps[:2]) and any(1e-3 < s["lr"] < 1e-2 for s in steps if s["tokens"] > 400)
    # λ switched by tokens; γ froze the bias after 640 tokens
    assert module.current_mtp_lambda() == 0.1
    router = module.decoder.layers[1].ffn.gate
    assert int(router.num_tokens_seen) == module.tokens_seen


def test_gamma_freezes_by_tokens(data: PretrainDataModule) -> None:
    module = _module()
    module.configure_model()
    router = module.decoder.layers[1].ffn.gate
    counts = torch.tensor([30, 10, 16, 8])  # 64 routed slots = 32 tokens x top-2
    for _ in range(20):
        router.update_after_step(counts)  # 20 steps x 32 tokens = 640 tokens
    frozen = router.e_score_correction_bias.clone()
    assert frozen.abs().sum() > 0
    router.update_after_step(counts)  # token 640 onwards: γ = 0
    assert torch.equal(router.e_score_correction_bias, frozen)
    assert int(router.num_tokens_seen) == 21 * 32


# -- the 671B recipe's stages: plain RoPE in pretraining, YaRN in the long-context extension ------
REPO = Path(__file__).resolve().parents[1]
PRETRAIN = REPO / "configs" / "pretrain"
# V3 report §4.3: YaRN with s = 40, α = 1, β = 32 and √t = 0.1·ln s + 1 in both extension stages;
# 1000 steps each, 32K tokens x 1920 sequences then 128K x 480, learning rate 7.3e-6
EXTENSION_STAGES = [
    ("v3-671b-ext32k.yaml", 32 * 1024, 1920, "v3-671b.yaml"),
    ("v3-671b-ext128k.yaml", 128 * 1024, 480, "v3-671b-ext32k.yaml"),
]


def _cli(config: Path, tmp_path: Path):
    from moeframe.cli import build_cli

    return build_cli(args=["-c", str(config), "--trainer.default_root_dir", str(tmp_path)], run=False)


def _yarn(cli) -> tuple[float, float, float, float]:
    options = cli.model.plan.attention.options
    return options.rope_factor, options.beta_slow, options.beta_fast, options.mscale_all_dim


def test_v3_pretraining_uses_plain_rope_at_4k(tmp_path: Path) -> None:
    cli = _cli(PRETRAIN / "v3-671b.yaml", tmp_path)
    assert cli.model.plan.attention.name == "mla"
    assert cli.model.plan.attention.options.rope_factor == 1.0  # no YaRN from step 0
    assert cli.model.config.max_seq_len == 4096 and cli.config.data.init_args.seq_len == 4096


def _released_yarn_softmax_scale() -> float:
    """V3's softmax scale at 40x: (128 + 64)^-0.5 · (0.1·ln 40 + 1)², from the report's numbers."""
    return (128 + 64) ** -0.5 * (0.1 * math.log(40) + 1) ** 2


@pytest.mark.parametrize("stage,seq_len,sequences,previous", EXTENSION_STAGES, ids=["32k", "128k"])
def test_v3_extension_stages_apply_yarn_from_the_previous_checkpoint(
    stage: str, seq_len: int, sequences: int, previous: str, tmp_path: Path
) -> None:
    import yaml

    from moeframe.training.callbacks import BatchSizeRamp
    from moeframe_mla.attention import softmax_scale

    cli = _cli(PRETRAIN / stage, tmp_path)
    assert _yarn(cli) == (40.0, 1.0, 32.0, 1.0)  # s, α, β, mscale coefficient
    assert cli.model.plan.attention.options.original_seq_len == 4096
    assert softmax_scale(cli.model.plan.attention.options) == pytest.approx(_released_yarn_softmax_scale(), rel=1e-12)
    assert cli.config.data.init_args.seq_len == seq_len <= cli.model.config.max_seq_len
    ramp = next(cb for cb in cli.trainer.callbacks if isinstance(cb, BatchSizeRamp))
    # a constant global batch: one sequence per micro-batch on one rank accumulates all of them, always
    assert ramp.target_accumulation(0, 1, 1) == sequences == ramp.target_accumulation(1e12, 1, 1)
    assert cli.trainer.max_steps == 1000
    assert cli.model.optim.lr == 7.3e-6 and cli.model.optim.schedule == "constant" and cli.model.optim.warmup_steps == 0
    # it continues from the previous stage's last checkpoint (weights), with the same shapes
    before = yaml.safe_load((PRETRAIN / previous).read_text())["trainer"]["default_root_dir"]
    assert cli.model.init_from == f"{before}/logs/version_0/checkpoints/last.ckpt"
    pretrain = _cli(PRETRAIN / "v3-671b.yaml", tmp_path).model.config
    from moeframe.training.finetune import SHAPE_FIELDS

    assert all(getattr(pretrain, f) == getattr(cli.model.config, f) for f in SHAPE_FIELDS)


def test_released_v3_preset_carries_yarn(tmp_path: Path) -> None:
    from moeframe.cli import build_cli

    cli = build_cli(
        args=[
            "-c",
            str(PRETRAIN / "tiny.yaml"),
            "--model.init_args.config",
            str(REPO / "configs" / "model" / "v3-671b.yaml"),
            "--trainer.default_root_dir",
            str(tmp_path),
        ],
        run=False,
    )
    assert _yarn(cli) == (40.0, 1.0, 32.0, 1.0)
    assert cli.model.config.max_seq_len == 163840  # max_position_embeddings of the release


def test_an_extension_stage_starts_from_plain_rope_weights_with_yarn_on(tmp_path: Path) -> None:
    """The extension stages' mechanism at toy size: the pretraining weights (no YaRN) load into the
    same model with YaRN switched on (YaRN adds no tensors), through ``init_from``."""
    import dataclasses

    import yaml

    from moeframe.convert import save_moeframe
    from moeframe.model.decoder import build_decoder
    from moeframe.training.finetune import FinetuneModule

    plain = ModelConfig(**yaml.safe_load((REPO / "configs" / "model" / "tiny-v3.yaml").read_text()))
    torch.manual_seed(0)
    pretrained = build_decoder(plain)
    save_moeframe(pretrained, tmp_path / "pretrained")
    yarn = dataclasses.replace(
        plain,
        max_seq_len=4 * plain.max_seq_len,
        attention={
            **plain.attention,
            "rope_factor": 4.0,
            "original_seq_len": plain.max_seq_len,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
        },
    )
    stage = FinetuneModule(init_from=str(tmp_path / "pretrained"), config=yarn, method="full", num_samples=0)
    stage.configure_model()
    assert stage.plan.attention.options.rope_factor == 4.0
    assert all(torch.equal(stage.decoder.state_dict()[k], v) for k, v in pretrained.state_dict().items())
    ids = torch.randint(0, plain.vocab_size, (1, 24))
    with torch.no_grad():  # same weights, other positions encoding: the logits differ
        assert not torch.allclose(stage.decoder(ids).logits, pretrained(ids).logits)
