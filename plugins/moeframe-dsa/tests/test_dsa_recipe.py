"""The V3.2 continued-training recipe's configs: release hyperparameters, stages chained, tiny versions,
and what ``moeframe inspect`` reports for the release model (cache bytes with the index keys)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moeframe.cli import build_cli, main

REPO = Path(__file__).resolve().parents[3]
PRETRAIN = REPO / "configs" / "pretrain"
# V3.2-Exp report §2.1: warm-up lr 1e-3, 1000 steps x 16 sequences x 128K tokens; sparse lr 7.3e-6,
# 15000 steps x 480 sequences x 128K tokens, k = 2048
STAGES = [
    ("v32-stage1-warmup.yaml", "dense_warmup", 1.0e-3, 1000, 16, ["*.indexer.*"]),
    ("v32-stage2-sparse.yaml", "sparse", 7.3e-6, 15000, 480, None),
]


def _cli(config: Path, tmp_path: Path):
    return build_cli(args=["-c", str(config), "--trainer.default_root_dir", str(tmp_path)], run=False)


@pytest.mark.parametrize("stage,mode,lr,steps,sequences,train_only", STAGES, ids=["stage1-warmup", "stage2-sparse"])
def test_release_stages_carry_the_reports_hyperparameters(
    stage: str, mode: str, lr: float, steps: int, sequences: int, train_only, tmp_path: Path
) -> None:
    from moeframe.training.callbacks import BatchSizeRamp

    cli = _cli(PRETRAIN / stage, tmp_path)
    options = cli.model.plan.attention.options
    assert cli.model.plan.attention.name == "dsa" and options.mode == mode
    assert (options.index_topk, options.index_n_heads, options.index_head_dim) == (2048, 64, 128)
    assert cli.model.optim.lr == lr and cli.model.optim.schedule == "constant" and cli.trainer.max_steps == steps
    assert cli.config.data.init_args.seq_len == 128 * 1024
    ramp = next(cb for cb in cli.trainer.callbacks if isinstance(cb, BatchSizeRamp))
    assert ramp.target_accumulation(0, 1, 1) == sequences == ramp.target_accumulation(1e12, 1, 1)
    assert cli.model.train_only == train_only and cli.model.new_parameters == train_only


def test_tiny_stages_chain_from_a_tiny_v3_run(tmp_path: Path) -> None:
    warmup, sparse = (
        _cli(PRETRAIN / "tiny-v32-warmup.yaml", tmp_path),
        _cli(PRETRAIN / "tiny-v32-sparse.yaml", tmp_path),
    )
    assert warmup.model.init_from.startswith("runs/tiny-v3/") and warmup.model.train_only == ["*.indexer.*"]
    assert sparse.model.init_from.startswith("runs/tiny-v32-warmup/") and sparse.model.train_only is None
    assert (
        warmup.model.plan.attention.options.mode == "dense_warmup"
        and sparse.model.plan.attention.options.mode == "sparse"
    )
    topk = sparse.model.plan.attention.options.index_topk
    assert topk < sparse.config.data.init_args.seq_len  # the sparse stage really selects


def test_inspect_reports_the_index_keys_in_the_cache(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(REPO / "configs" / "model" / "v32-exp.yaml"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["kv_cache_bytes_per_token"] == 61 * (512 + 64 + 128) * 2  # latent + rope key + index key, bf16
