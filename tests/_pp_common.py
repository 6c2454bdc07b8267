"""The run the pipeline tests compare: the tiny V3 model (MLA, aux-free router with its sequence
balance loss, MTP) at 4 layers, short sequences, a few steps, gradient clipping on."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import yaml

from moeframe.config import ModelConfig, OptimConfig
from moeframe.data.shards import PretrainDataModule
from moeframe.training.pretrain import PretrainModule

REPO = Path(__file__).resolve().parents[1]
SEQ_LEN = 16


def model_config(**overrides: Any) -> ModelConfig:
    fields = yaml.safe_load((REPO / "configs/model/tiny-v3.yaml").read_text())
    fields.update(max_seq_len=SEQ_LEN, **overrides)
    return ModelConfig(**fields)


def pretrain_module(**overrides: Any) -> PretrainModule:
    L.seed_everything(0, verbose=False)
    return PretrainModule(model_config(**overrides), OptimConfig(lr=1e-2, warmup_steps=0))


def data_module(batch_size: int = 4, val_permille: int = 0) -> PretrainDataModule:
    return PretrainDataModule(seq_len=SEQ_LEN, batch_size=batch_size, max_bytes=40_000, val_permille=val_permille)


def trainer_settings() -> dict[str, Any]:
    return dict(
        accelerator="cpu",
        gradient_clip_val=0.5,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=False,
    )
