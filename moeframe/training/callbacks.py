"""Callbacks every moeframe run uses: token throughput, the loss-curve plot, the logger step after a resume."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback, ThroughputMonitor
from lightning.pytorch.utilities import rank_zero_only

from moeframe.compat import set_logger_step


def _tokens(batch: Any) -> int:
    return int(batch["input_ids"].numel())


def _sequences(batch: Any) -> int:
    return int(batch["input_ids"].shape[0])


class TokenThroughput(ThroughputMonitor):
    """Lightning's ThroughputMonitor, counting tokens: logs ``train/items_per_sec`` (tokens/s per
    run), ``train/samples_per_sec`` (sequences/s) and their per-device variants."""

    def __init__(self, window_size: int = 5, separator: str = "/") -> None:
        super().__init__(batch_size_fn=_sequences, length_fn=_tokens, window_size=window_size, separator=separator)


def log_dir(trainer: L.Trainer) -> Path:
    """Where the run's logs live: the first logger's folder, else the trainer's root dir."""
    for logger in trainer.loggers:
        if getattr(logger, "log_dir", None):
            return Path(logger.log_dir)
    return Path(trainer.default_root_dir)


class LossCurvePlot(Callback):
    """Records train and validation loss and writes ``loss_curves.png`` next to the logs when
    fitting ends. The history is part of the checkpoint, so a resumed run plots the whole run."""

    def __init__(self, filename: str = "loss_curves.png") -> None:
        self.filename = filename
        self.train: list[tuple[int, float]] = []
        self.val: list[tuple[int, float]] = []

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = trainer.callback_metrics.get("train/loss")
        if loss is not None:
            self.train.append((trainer.global_step, float(loss)))

    def on_sanity_check_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        initial = getattr(pl_module, "initial_val_loss", None)
        if initial is not None and not self.val:
            self.val.append((trainer.global_step, initial))

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # runs after the module's on_validation_epoch_end has logged val/loss
        if trainer.sanity_checking:
            return
        loss = trainer.callback_metrics.get("val/loss")
        if loss is not None:
            self.val.append((trainer.global_step, float(loss)))

    def state_dict(self) -> dict[str, Any]:
        return {"train": self.train, "val": self.val}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.train, self.val = list(state_dict["train"]), list(state_dict["val"])

    @rank_zero_only
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.path: Path | None = plot_losses(self.train, self.val, log_dir(trainer) / self.filename)


def _smooth(values: list[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def plot_losses(train: list[tuple[int, float]], val: list[tuple[int, float]], path: Path) -> Path | None:
    if not train and not val:
        return None
    import matplotlib

    matplotlib.use("Agg")  # headless: never needs a display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    if train:
        steps, losses = zip(*train)
        ax.plot(steps, losses, color="tab:blue", alpha=0.25, linewidth=0.8)
        ax.plot(
            steps, _smooth(list(losses), max(1, len(losses) // 50)), color="tab:blue", label="train loss (smoothed)"
        )
    if val:
        steps, losses = zip(*val)
        ax.plot(steps, losses, "o-", color="tab:orange", label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


class BatchSizeRamp(Callback):
    """Grow the global batch with the tokens seen, by gradient accumulation (DeepSeek-V3: 3,072 to
    15,360 sequences over the first 469B tokens, then constant).

    The target is ``start + (end − start)·tokens/ramp_tokens`` sequences; accumulation becomes
    ``round(target / (micro-batch · ranks))``. Lightning closes an accumulation window when the
    epoch's batch counter is a multiple of ``accumulate_grad_batches``, so a new value is applied
    only at a step boundary where the counter is also a multiple of it: every optimizer step then
    averages exactly the number of micro-batches it was scaled for (the change may wait up to one
    window). Reads ``tokens_seen`` from the LightningModule (PretrainModule keeps it).
    """

    def __init__(self, start_sequences: int, end_sequences: int, ramp_tokens: float) -> None:
        if not 0 < start_sequences <= end_sequences or ramp_tokens <= 0:
            raise ValueError(
                "BatchSizeRamp needs 0 < start_sequences <= end_sequences and ramp_tokens > 0, got "
                f"{start_sequences}, {end_sequences}, {ramp_tokens}"
            )
        self.start, self.end, self.ramp_tokens = start_sequences, end_sequences, ramp_tokens

    def target_accumulation(self, tokens: float, micro_batch: int, world_size: int) -> int:
        from moeframe.schedules import piecewise

        sequences = piecewise(tokens, self.start, [[self.ramp_tokens, self.end, "linear"]])
        return max(1, round(sequences / (micro_batch * world_size)))

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        micro = int(batch["input_ids"].shape[0])
        ready = trainer.fit_loop.epoch_loop.batch_progress.current.ready
        if ready % trainer.accumulate_grad_batches:
            return  # inside an accumulation window: never change its length
        target = self.target_accumulation(getattr(pl_module, "tokens_seen", 0), micro, trainer.world_size)
        if target != trainer.accumulate_grad_batches and ready % target == 0:
            trainer.accumulate_grad_batches = target
        pl_module.log("train/global_batch", float(trainer.accumulate_grad_batches * micro * trainer.world_size))


class LoggerStepAfterResume(Callback):
    """Keeps the step Lightning hands the loggers equal to the optimizer step, across resumes.

    Lightning 2.6 keeps the logger step in ``fit_loop.epoch_loop._batches_that_stepped`` and
    increments it at the very end of each training step, after validation. When it restores a
    checkpoint it guesses from the progress counters whether the saved value was taken before that
    increment (a save during validation within the step) or after it; a checkpoint written at the
    end of an epoch (``ModelCheckpoint`` with epoch-end validation) or after ``fit`` returned looks
    the same and gets one increment too many: every later row of metrics.csv (train and val) is
    labelled one step late. With automatic optimization the logger step equals ``global_step``
    whenever a batch starts and when an epoch ends in an uninterrupted run, so it is set to that
    there. Put first among the callbacks (``ensure_logger_step_alignment``, called by
    ``PretrainModule.configure_callbacks``): LearningRateMonitor logs in the same hook.
    """

    def _align(self, trainer: L.Trainer) -> None:
        if trainer.lightning_module.automatic_optimization:
            set_logger_step(trainer, trainer.global_step)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._align(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._align(trainer)


def ensure_logger_step_alignment(trainer: L.Trainer) -> None:
    """Put ``LoggerStepAfterResume`` first among the trainer's callbacks (once)."""
    if not any(isinstance(cb, LoggerStepAfterResume) for cb in trainer.callbacks):
        trainer.callbacks.insert(0, LoggerStepAfterResume())
