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


_EXIT_SCRIPT = """
import atexit, sys
import torch.distributed as dist
sys.path.insert(0, {tests!r})
# registered first, so it runs last: what the process group looks like when the interpreter ends
atexit.register(lambda: print("initialized at exit:", dist.is_initialized(), flush=True))
import lightning as L
import test_module_callbacks as t
Trainer = L.Trainer
t.L.Trainer = lambda **kw: Trainer(strategy="ddp", devices=1, **kw)
trainer = t._fit(__import__("pathlib").Path({tmp!r}), [])
print("fit under", dist.get_backend(), flush=True)
"""


def test_a_gloo_process_group_is_destroyed_before_the_interpreter_exits(tmp_path: Path) -> None:
    """Lightning destroys only NCCL groups at exit; a gloo group left to interpreter finalisation
    makes a finished run abort at random (exit -6). The module registers the destroy itself."""
    import subprocess
    import sys

    from .conftest import clean_env

    script = _EXIT_SCRIPT.format(tests=str(Path(__file__).parent), tmp=str(tmp_path))
    run = subprocess.run(
        [sys.executable, "-c", script], env=clean_env(), capture_output=True, text=True, timeout=240, cwd=tmp_path
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "fit under gloo" in run.stdout and "initialized at exit: False" in run.stdout, run.stdout
