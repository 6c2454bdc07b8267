"""Helpers (no tests) for the fine-tuning tests: a small model, a pretrained-like checkpoint, a short fit."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import torch

from moeframe.config import ModelConfig, OptimConfig
from moeframe.convert.hf import save_moeframe
from moeframe.data.sft import SFTDataModule
from moeframe.model.decoder import build_decoder
from moeframe.training.finetune import FinetuneModule

TINY = dict(
    vocab_size=260,
    dim=32,
    n_layers=3,
    first_k_dense=1,
    n_heads=2,
    dense_ffn_dim=64,
    moe_ffn_dim=16,
    n_routed_experts=4,
    n_activated_experts=2,
    n_shared_experts=1,
    max_seq_len=128,
    init_std=0.02,
)


def tiny_config(**changes: Any) -> ModelConfig:
    return ModelConfig(**{**TINY, **changes})


def pretrained_folder(folder: Path, seed: int = 0, **changes: Any) -> Path:
    """A moeframe folder with random weights standing in for a pretrained model."""
    torch.manual_seed(seed)
    return save_moeframe(build_decoder(tiny_config(**changes)), folder)


def small_data(**kwargs: Any) -> SFTDataModule:
    return SFTDataModule(**{"task_num_train": 64, "task_num_val": 8, "seq_len": 64, "batch_size": 4, **kwargs})


def fit(module: FinetuneModule, data: SFTDataModule, root: Path, steps: int = 3) -> L.Trainer:
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=str(root),
    )
    trainer.fit(module, datamodule=data)
    return trainer


def optim(lr: float = 1e-2) -> OptimConfig:
    return OptimConfig(lr=lr, warmup_steps=0, weight_decay=0.1, schedule="constant")


def write_json(path: Path, value: Any) -> Path:
    path.write_text(json.dumps(value))
    return path


HF_TINY = dict(
    vocab_size=300,
    hidden_size=32,
    intermediate_size=64,
    moe_intermediate_size=16,
    num_hidden_layers=3,
    num_attention_heads=2,
    num_key_value_heads=2,
    n_routed_experts=4,
    num_experts_per_tok=2,
    n_shared_experts=1,
    first_k_dense_replace=1,
    kv_lora_rank=16,
    q_lora_rank=16,
    qk_nope_head_dim=8,
    qk_rope_head_dim=4,
    v_head_dim=8,
    max_position_embeddings=128,
    num_nextn_predict_layers=0,
    n_group=1,
    topk_group=1,
)


def hf_folder(folder: Path, seed: int = 0) -> Path:
    """A tiny DeepSeek-V3 saved by transformers itself (as tests/test_convert.py does)."""
    import transformers

    torch.manual_seed(seed)
    model = transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(**HF_TINY))
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "e_score_correction_bias"):
                m.e_score_correction_bias.normal_(0, 0.2)
    model.save_pretrained(folder)
    return folder
