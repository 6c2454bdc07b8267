"""The callbacks every fit of a moeframe module needs are attached by the module itself
(``LightningModule.configure_callbacks``): present without any run config, and a run config's
own instance keeps its options (Lightning replaces a trainer callback by the module's callback
of the same type, so the module returns only the kinds the run config lacks)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest

from moeframe.config import OptimConfig
from moeframe.testing import tiny_config
from moeframe.training.balance import ExpertBalance
from moeframe.training.callbacks import LoggerStepAfterResume
from moeframe.training.checkpoint_io import AtomicCheckpointIO
from moeframe.training.reliability import Reliability


def _fit(tmp_path: Path, callbacks: list[L.Callback], steps: int = 1) -> L.Trainer:
    from moeframe.data.shards import PretrainDataModule
    from moeframe.training.pretrain import PretrainModule

    L.seed_everything(0)
    model = PretrainModule(
        tiny_config(vocab_size=260, n_layers=2, first_k_dense=1, n_routed_experts=4, n_activated_experts=2),
        OptimConfig(warmup_steps=1),
    )
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        enable_checkpointing=False,
        callbacks=callbacks,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, PretrainDataModule(seq_len=16, batch_size=2, max_bytes=50_000))
    return trainer


def _of(trainer: L.Trainer, kind: type) -> list[L.Callback]:
    return [c for c in trainer.callbacks if isinstance(c, kind)]


def test_needed_callbacks_are_attached_and_configured_ones_keep_their_options(tmp_path: Path) -> None:
    mine = [ExpertBalance(log_every_n_steps=3, collapse_patience=7, heatmaps=False), Reliability(nonfinite="stop")]
    trainer = _fit(tmp_path / "configured", list(mine))
    balance, guard = _of(trainer, ExpertBalance), _of(trainer, Reliability)
    assert balance == [mine[0]] and guard == [mine[1]]  # the very instances, once each
    assert (balance[0].log_every_n_steps, balance[0].collapse_patience, guard[0].nonfinite) == (3, 7, "stop")
    assert isinstance(trainer.callbacks[0], LoggerStepAfterResume)  # before LearningRateMonitor & co
    assert len(_of(trainer, LoggerStepAfterResume)) == 1
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)  # Reliability.setup ran

    trainer = _fit(tmp_path / "bare", [])
    assert [len(_of(trainer, k)) for k in (ExpertBalance, Reliability, LoggerStepAfterResume)] == [1, 1, 1]
    assert _of(trainer, Reliability)[0].nonfinite == "skip"  # the defaults
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)


def test_router_fault_options_given_to_reliability_still_work_with_one_warning(tmp_path: Path) -> None:
    with pytest.warns(FutureWarning, match=r"Reliability\(collapse_patience\) is deprecated.*ExpertBalance") as caught:
        guard = Reliability(collapse_patience=2)
    assert len([w for w in caught if issubclass(w.category, FutureWarning)]) == 1
    trainer = _fit(tmp_path, [guard])
    assert _of(trainer, ExpertBalance)[0].collapse_patience == 2
