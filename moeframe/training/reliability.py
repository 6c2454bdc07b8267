"""Reliability for long runs: exact resume, preemption and non-finite steps.

``Reliability`` is a Lightning callback that ``PretrainModule`` attaches to every fit (through
``configure_callbacks``, like ``ExpertBalance``); put it in a run config's ``trainer.callbacks``
to change its options.

What it does, per optimizer step, with ONE all-reduce of a small float64 vector (the per-rank
flags and the step's loss sum), so every rank takes the same decision:

- **Preemption.** SIGTERM and SIGUSR1 only set a flag (a signal handler never runs a collective or
  writes a file). At the next step boundary the ranks agree that one of them was signalled, save a
  checkpoint (``last.ckpt`` in the ModelCheckpoint folder; under SLURM auto-requeue, SIGUSR1 saves
  ``hpc_ckpt_N.ckpt`` in ``default_root_dir``, which Lightning restores by itself in the requeued
  job, and requeues the job with ``scontrol requeue``) and leave through Lightning's
  ``SIGTERMException``: a clean exit, status 0, nothing half written.
- **Non-finite loss or gradient.** Policy ``skip``: the step's gradients are dropped (AdamW then
  leaves weights and moments untouched), the step is counted (``reliability/skipped_steps``) and
  training goes on; ``max_consecutive_nonfinite`` skipped steps in a row stop the run. Policy
  ``stop``: the first one stops it. Before stopping, the batch is run forward once more with
  forward hooks on every module (armed only for this diagnosis) to name the first module whose
  output became non-finite; the error names the step, that module and the last good checkpoint.
  Under DeepSpeed the engine steps by itself, so a non-finite loss always stops the run.
- **Loss spikes.** A step loss above ``loss_spike_factor`` × the mean of the previous
  ``loss_spike_window`` step losses is an event.
- **RNG states of every rank** (torch, CUDA, numpy, Python) travel in the checkpoint and are put
  back right before the first training batch after a resume, where the uninterrupted run stood.

Router faults (an expert without tokens, a layer whose MaxVio stays high) are the
``ExpertBalance`` callback's (``moeframe.training.balance``), which owns the expert counts.
Checkpoint files (atomic writes, verification, the newest intact checkpoint) are
``moeframe.training.checkpoint_io``'s; its names are re-exported here for the code written
against earlier releases.

Events go to ``<log dir>/events.jsonl`` (one JSON object per line) and to the trainer's loggers
under ``reliability/...``.
"""

from __future__ import annotations

import logging
import os
import random
import re
import signal
import subprocess
import threading
import warnings
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch import nn

from moeframe.compat import flush_step_metrics
from moeframe.errors import TrainingFault

# re-exported: the import paths of earlier releases keep working
from moeframe.training.checkpoint_io import (  # noqa: F401
    AtomicCheckpointIO,
    find_resumable_checkpoint,
    newest_other_checkpoint,
    partial_name,
    remove_stale_partials,
    replace_folder,
    save_checkpoint_atomically,
    state_dict_differences,
    verify_checkpoint,
)
from moeframe.training.events import EVENTS_FILE, write_event

__all__ = [
    "AtomicCheckpointIO",
    "EVENTS_FILE",
    "NonFiniteError",
    "Reliability",
    "find_resumable_checkpoint",
    "first_nonfinite_module",
    "newest_other_checkpoint",
    "partial_name",
    "remove_stale_partials",
    "replace_folder",
    "save_checkpoint_atomically",
    "state_dict_differences",
    "verify_checkpoint",
]

log = logging.getLogger(__name__)

_SWEEP_DEPTH = 3  # default_root_dir/logs/version_N/checkpoints


class NonFiniteError(TrainingFault):
    """Training stopped on non-finite losses or gradients."""


def _steps_by_itself(trainer: L.Trainer) -> bool:
    """DeepSpeed's engine steps its optimizer itself: a step cannot be skipped from a callback."""
    from lightning.pytorch.strategies import DeepSpeedStrategy

    return isinstance(trainer.strategy, DeepSpeedStrategy)


# -- finding the first module whose output is non-finite ---------------------------------------------
def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    if hasattr(value, "__dataclass_fields__"):
        return [t for name in value.__dataclass_fields__ for t in _tensors(getattr(value, name))]
    return []


@torch.no_grad()
def first_nonfinite_module(model: nn.Module, run: Callable[[], Any]) -> str | None:
    """Run ``run()`` (a forward through ``model``) with a forward hook on every submodule and
    return the qualified name of the first module, in execution order, whose output holds a NaN
    or an infinity (None if none does). Modules finish before their parents, so this names the
    innermost culprit. Buffers (expert counts) are restored afterwards."""
    found: list[str] = []
    names = {m: n for n, m in model.named_modules() if n}

    def hook(module: nn.Module, _args: Any, output: Any) -> None:
        if not found and any(t.is_floating_point() and not bool(torch.isfinite(t).all()) for t in _tensors(output)):
            found.append(names[module])

    saved = {n: b.detach().clone() for n, b in model.named_buffers()}
    handles = [m.register_forward_hook(hook) for m in names]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
        for n, b in model.named_buffers():
            b.copy_(saved[n])
    return found[0] if found else None


# -- RNG states ---------------------------------------------------------------------------------------
def _rng_state() -> dict[str, Any]:
    # numpy's state as tensors and plain numbers: checkpoints load with torch.load(weights_only=True)
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    numpy_state = {
        "name": name,
        "keys": torch.from_numpy(keys.astype(np.int64)),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "gauss": float(gauss),
    }
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "numpy": numpy_state, "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    random.setstate(state["python"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


# -- the callback --------------------------------------------------------------------------------------
# the router-fault options moved to ExpertBalance (moeframe.training.balance); still accepted here
LEGACY_ROUTER_OPTIONS = ("collapse_patience", "maxvio_threshold", "maxvio_patience")


class Reliability(Callback):
    """Preemption, non-finite steps, loss spikes, RNG states (see the module docstring).

    Args:
        nonfinite: ``skip`` (skip the step and count it) or ``stop`` (stop at the first).
        max_consecutive_nonfinite: with ``skip``, stop after this many skipped steps in a row.
        loss_spike_factor: a step loss above this × the running mean is a ``loss_spike`` event
            (0 disables).
        loss_spike_window: steps in the running mean (events start once it is full).
        collapse_patience, maxvio_threshold, maxvio_patience: deprecated, options of
            ``ExpertBalance`` now (the owner of the expert counts); given here, they are handed
            to the run's ExpertBalance with one deprecation warning.
        on_corrupt_checkpoint: when the checkpoint to resume from is corrupt: ``error`` or
            ``previous`` (the newest intact checkpoint in its folder, with a warning).
        handle_signals: take over SIGTERM/SIGUSR1 (checkpoint at the next step, clean exit).
    """

    def __init__(
        self,
        nonfinite: Literal["skip", "stop"] = "skip",
        max_consecutive_nonfinite: int = 5,
        loss_spike_factor: float = 3.0,
        loss_spike_window: int = 50,
        collapse_patience: int | None = None,
        maxvio_threshold: float | None = None,
        maxvio_patience: int | None = None,
        on_corrupt_checkpoint: Literal["error", "previous"] = "error",
        handle_signals: bool = True,
    ) -> None:
        if nonfinite not in ("skip", "stop"):
            raise ValueError(f"Reliability: nonfinite must be 'skip' or 'stop', got {nonfinite!r}")
        if on_corrupt_checkpoint not in ("error", "previous"):
            raise ValueError(
                f"Reliability: on_corrupt_checkpoint must be 'error' or 'previous', got {on_corrupt_checkpoint!r}"
            )
        for name, value in (
            ("max_consecutive_nonfinite", max_consecutive_nonfinite),
            ("loss_spike_window", loss_spike_window),
        ):
            if value < 1:
                raise ValueError(f"Reliability: {name} must be >= 1, got {value}")
        self.nonfinite, self.max_consecutive_nonfinite = nonfinite, max_consecutive_nonfinite
        self.loss_spike_factor, self.loss_spike_window = loss_spike_factor, loss_spike_window
        self.collapse_patience, self.maxvio_threshold, self.maxvio_patience = (
            collapse_patience,
            maxvio_threshold,
            maxvio_patience,
        )
        if self.legacy_router_options():
            warnings.warn(
                "Reliability(" + ", ".join(self.legacy_router_options()) + ") is deprecated: router faults "
                "are the ExpertBalance callback's now; set these options on "
                "moeframe.training.balance.ExpertBalance",
                FutureWarning,
                stacklevel=2,
            )
        self.on_corrupt_checkpoint, self.handle_signals = on_corrupt_checkpoint, handle_signals
        # state saved in checkpoints
        self.skipped_steps = 0
        self.consecutive_nonfinite = 0
        self.losses: deque[float] = deque(maxlen=loss_spike_window)
        self.events: list[dict[str, Any]] = []  # this process's events (also in events.jsonl)
        # per run
        self.signal_received: int | None = None
        self.preempted_to: Path | None = None
        self._pending_rng: dict[str, Any] | None = None
        self._batch: Any = None
        self._loss_sum: torch.Tensor | None = None
        self._loss_bad: torch.Tensor | None = None
        self._micro = 0
        self._agreed: list[float] | None = None
        self._previous_handlers: dict[int, Any] = {}

    def legacy_router_options(self) -> dict[str, Any]:
        """The deprecated router-fault options this callback was given (for ExpertBalance)."""
        return {k: getattr(self, k) for k in LEGACY_ROUTER_OPTIONS if getattr(self, k) is not None}

    @property
    def state_key(self) -> str:
        return "moeframe.Reliability"  # the same whatever the options, so a resume may change them

    # -- setup ----------------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        io_plugin = trainer.strategy.checkpoint_io
        if type(io_plugin) is TorchCheckpointIO:  # Lightning's default: made atomic
            trainer.strategy.checkpoint_io = AtomicCheckpointIO(self.on_corrupt_checkpoint)
        elif isinstance(io_plugin, AtomicCheckpointIO):
            io_plugin.on_corrupt = self.on_corrupt_checkpoint

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if _steps_by_itself(trainer) and self.nonfinite == "skip":
            rank_zero_info(
                "Reliability: DeepSpeed steps its optimizer itself, so a non-finite loss stops the run "
                "(the 'skip' policy needs the gradients in the module)"
            )
        rank_zero_info(f"moeframe: training from step {trainer.global_step} (max_steps {trainer.max_steps})")
        self._know_checkpoints(trainer)
        if self.handle_signals:
            self._install_signal_handlers(trainer)

    def _know_checkpoints(self, trainer: L.Trainer) -> None:
        """Tell the checkpoint writer where this run's intact checkpoints lie (a full disk names one),
        and remove what saves killed in earlier runs left behind (full-size hidden partials)."""
        resumed = Path(trainer.ckpt_path) if trainer.ckpt_path and Path(trainer.ckpt_path).exists() else None
        io_plugin = trainer.strategy.checkpoint_io
        if isinstance(io_plugin, AtomicCheckpointIO):
            io_plugin.resumed_from, io_plugin.run_root = resumed, Path(trainer.default_root_dir)
        if not trainer.is_global_zero:
            return
        callback = trainer.checkpoint_callback
        # default_root_dir down to <logs>/version_N/checkpoints, not the data that may lie below it
        folders = [(Path(trainer.default_root_dir), _SWEEP_DEPTH)]
        if isinstance(callback, ModelCheckpoint) and callback.dirpath:
            folders.append((Path(callback.dirpath), 0))
        if resumed is not None:
            folders.append((resumed.parent, 0))
        removed = [p for folder, depth in folders for p in remove_stale_partials(folder, depth)]
        if removed:
            rank_zero_info(
                f"moeframe: removed {len(removed)} partial checkpoint(s) left by saves that were killed: "
                + ", ".join(str(p) for p in removed[:3])
                + (" ..." if len(removed) > 3 else "")
            )

    # signals: handlers installed after Lightning's (which register when the run starts), so a
    # signal only sets a flag here; Lightning's SIGTERM handler would run a collective inside the
    # handler and stop without a checkpoint
    def _install_signal_handlers(self, trainer: L.Trainer) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        if getattr(trainer, "received_sigterm", False):  # arrived before training started
            self.signal_received = int(signal.SIGTERM)
        for signum in (signal.SIGTERM, signal.SIGUSR1):
            self._previous_handlers[int(signum)] = signal.getsignal(signum)
            signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, _frame: Any) -> None:
        if self.signal_received is None or signum == signal.SIGUSR1:
            self.signal_received = int(signum)
        # stderr, not logging: a handler may interrupt a logging call holding its lock
        os.write(2, f"moeframe: received signal {signum}; a checkpoint follows at the next step boundary\n".encode())

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if threading.current_thread() is threading.main_thread():
            for signum, handler in self._previous_handlers.items():
                if handler is not None:
                    signal.signal(signum, handler)
        self._previous_handlers = {}

    # -- per micro-batch ----------------------------------------------------------------------------
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._pending_rng is not None:  # resumed: continue the random streams where they were saved
            _set_rng_state(self._pending_rng)
            self._pending_rng = None
        self._batch = batch

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        loss = loss.detach().float()
        bad = (~torch.isfinite(loss)).double()
        self._loss_bad = bad if self._loss_bad is None else self._loss_bad + bad
        value = torch.nan_to_num(loss.double(), nan=0.0, posinf=0.0, neginf=0.0)
        self._loss_sum = value if self._loss_sum is None else self._loss_sum + value
        self._micro += 1

    # -- once per optimizer step, before the update ----------------------------------------------------
    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        device = pl_module.device
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        grad_bad = torch.zeros((), dtype=torch.float64, device=device)
        if grads:
            norm = torch.nn.utils.get_total_norm(grads)
            if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor over the shards
                norm = norm.full_tensor()
            grad_bad = (~torch.isfinite(norm)).double().to(device)
        zero = torch.zeros((), dtype=torch.float64, device=device)
        flags = torch.stack(
            [
                torch.tensor(float(self.signal_received is not None), dtype=torch.float64, device=device),
                (self._loss_bad if self._loss_bad is not None else zero).to(device),
                grad_bad,
                (self._loss_sum if self._loss_sum is not None else zero).to(device),
                torch.tensor(float(self._micro), dtype=torch.float64, device=device),
            ]
        )
        if _distributed():
            dist.all_reduce(flags, op=dist.ReduceOp.SUM)
        self._agreed = flags.tolist()
        self._loss_sum, self._loss_bad, self._micro = None, None, 0
        if self._agreed[1] > 0 or self._agreed[2] > 0:
            self._nonfinite_step(trainer, pl_module, loss_bad=self._agreed[1] > 0)
        else:
            self.consecutive_nonfinite = 0

    def _nonfinite_step(self, trainer: L.Trainer, pl_module: L.LightningModule, loss_bad: bool) -> None:
        step = trainer.global_step + 1  # the step being taken
        what = "loss" if loss_bad else "gradient"
        module = self._diagnose(pl_module)
        where = (
            f"first non-finite output: {module}" if module else "no module output was non-finite (the backward pass)"
        )
        self.consecutive_nonfinite += 1
        stop = (
            self.nonfinite == "stop"
            or _steps_by_itself(trainer)
            or self.consecutive_nonfinite >= self.max_consecutive_nonfinite
        )
        self._event(
            trainer,
            "nonfinite",
            step=step,
            what=what,
            module=module,
            consecutive=self.consecutive_nonfinite,
            action="stop" if stop else "skip",
        )
        if stop:
            raise NonFiniteError(
                f"non-finite {what} at step {step} ({self.consecutive_nonfinite} step(s) in a row; {where}); "
                f"last good checkpoint: {self._last_checkpoint(trainer) or 'none saved yet'}"
            )
        for p in pl_module.parameters():  # AdamW skips parameters without a gradient: no update at all
            p.grad = None
        self.skipped_steps += 1
        self._log(trainer, {"reliability/skipped_steps": float(self.skipped_steps)}, step)
        rank_zero_warn(f"step {step}: non-finite {what} ({where}); step skipped ({self.skipped_steps} so far)")

    def _diagnose(self, pl_module: L.LightningModule) -> str | None:
        batch = self._batch
        if not isinstance(batch, dict) or "input_ids" not in batch:
            return None
        was_training = pl_module.training
        try:
            return first_nonfinite_module(pl_module, lambda: pl_module(batch["input_ids"], batch.get("document_ids")))
        except Exception as exc:  # a diagnosis must never hide the fault it diagnoses
            log.warning(f"could not locate the non-finite module: {exc}")
            return None
        finally:
            pl_module.train(was_training)

    def _last_checkpoint(self, trainer: L.Trainer) -> str | None:
        io_plugin = trainer.strategy.checkpoint_io
        if isinstance(io_plugin, AtomicCheckpointIO) and io_plugin.last_saved is not None:
            return str(io_plugin.last_saved)
        callback = trainer.checkpoint_callback
        if isinstance(callback, ModelCheckpoint) and callback.last_model_path:
            return callback.last_model_path
        if self.preempted_to is not None:
            return str(self.preempted_to)
        return getattr(trainer, "ckpt_path", None)

    # -- once per optimizer step, after the update ------------------------------------------------------
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        agreed, self._agreed = self._agreed, None
        self._batch = None
        if agreed is None:  # inside a gradient-accumulation window
            return
        step = trainer.global_step
        if agreed[1] == 0 and agreed[2] == 0 and agreed[4] > 0:
            self._watch_loss(trainer, agreed[3] / agreed[4], step)
        if agreed[0] > 0:
            self._preempt(trainer)

    def _watch_loss(self, trainer: L.Trainer, loss: float, step: int) -> None:
        full = len(self.losses) == self.loss_spike_window
        if self.loss_spike_factor > 0 and full:
            mean = sum(self.losses) / len(self.losses)
            if mean > 0 and loss > self.loss_spike_factor * mean:
                self._event(trainer, "loss_spike", step=step, loss=loss, running_mean=mean, ratio=loss / mean)
                self._log(trainer, {"reliability/loss_spike_ratio": loss / mean}, step)
        self.losses.append(loss)

    def _preempt(self, trainer: L.Trainer) -> None:
        signum = int(signal.SIGTERM) if self.signal_received is None else self.signal_received
        requeue = signum == signal.SIGUSR1 and _slurm_auto_requeue(trainer)
        if requeue:
            # SLURM's warning before the time limit: hpc_ckpt_N.ckpt in default_root_dir, which
            # Lightning restores by itself in the requeued job, then `scontrol requeue`
            self.preempted_to = save_checkpoint_atomically(trainer, hpc_checkpoint_path(trainer))
            if trainer.is_global_zero:
                _requeue_slurm_job()
        else:
            self.preempted_to = save_checkpoint_atomically(trainer, preemption_path(trainer))
        self._event(
            trainer,
            "preempted",
            step=trainer.global_step,
            signal=signal.Signals(signum).name,
            checkpoint=str(self.preempted_to),
            requeued=requeue,
        )
        rank_zero_info(
            f"moeframe: preempted by {signal.Signals(signum).name} at step {trainer.global_step}; "
            f"checkpoint saved to {self.preempted_to}"
        )
        # this step's metrics are sent to the loggers after this hook; send them now, or the
        # logged curve would miss the step the run was preempted at
        flush_step_metrics(trainer)
        raise SIGTERMException

    # -- events ---------------------------------------------------------------------------------------
    def _event(self, trainer: L.Trainer, kind: str, **fields: Any) -> None:
        write_event(trainer, self.events, kind, **fields)

    @staticmethod
    def _log(trainer: L.Trainer, metrics: dict[str, float], step: int) -> None:
        if trainer.global_rank != 0:
            return
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)

    # -- checkpointing ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        # called on every rank while a checkpoint is dumped: gather every rank's RNG state
        mine = _rng_state()
        if _distributed():
            every: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(every, mine)
        else:
            every = [mine]
        return {
            "rng": every,
            "skipped_steps": self.skipped_steps,
            "consecutive_nonfinite": self.consecutive_nonfinite,
            "losses": list(self.losses),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        rank = dist.get_rank() if _distributed() else 0
        states = state_dict.get("rng") or []
        if rank < len(states):
            self._pending_rng = states[rank]
        else:
            rank_zero_warn(
                f"the checkpoint holds RNG states for {len(states)} rank(s); rank {rank} starts from its seed"
            )
        self.skipped_steps = int(state_dict.get("skipped_steps", 0))
        self.consecutive_nonfinite = int(state_dict.get("consecutive_nonfinite", 0))
        self.losses = deque(state_dict.get("losses", []), maxlen=self.loss_spike_window)


def preemption_path(trainer: L.Trainer) -> Path:
    """Where a preempted run leaves its checkpoint: ``last.ckpt`` in the ModelCheckpoint folder
    (what ``--ckpt_path last`` finds), else under ``default_root_dir/checkpoints``."""
    callback = trainer.checkpoint_callback
    folder = getattr(callback, "dirpath", None) if isinstance(callback, ModelCheckpoint) else None
    folder = trainer.strategy.broadcast(str(folder or Path(trainer.default_root_dir) / "checkpoints"))
    return Path(folder) / "last.ckpt"


def _slurm_auto_requeue(trainer: L.Trainer) -> bool:
    """Whether Lightning runs this job under SLURM with auto-requeue (its default there). A
    single-device strategy has no cluster environment of its own: SLURM is then detected from the
    environment, as Lightning does when it installs its requeue handler."""
    environment = getattr(trainer.strategy, "cluster_environment", None)
    if environment is None and SLURMEnvironment.detect():
        environment = SLURMEnvironment()
    return isinstance(environment, SLURMEnvironment) and environment.auto_requeue


def hpc_checkpoint_path(trainer: L.Trainer) -> Path:
    """``default_root_dir/hpc_ckpt_N.ckpt`` with N one above the highest number among the names in
    that folder that contain ``ckpt_`` (Lightning's own numbering, so its automatic restore of the
    highest ``hpc_ckpt_N`` in a requeued job finds it)."""
    root = Path(trainer.default_root_dir)
    numbers = [
        int(digits)
        for p in (root.iterdir() if root.is_dir() else [])
        if "ckpt_" in p.name and (digits := re.sub("[^0-9]", "", p.name.split("ckpt_")[-1]))
    ]
    path = root / f"hpc_ckpt_{max(numbers, default=0) + 1}.ckpt"
    return Path(trainer.strategy.broadcast(str(path)))


def _requeue_slurm_job() -> None:
    """``scontrol requeue`` this job (an array task by its array job and task ids)."""
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    job_id = f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array_job else os.environ["SLURM_JOB_ID"]
    try:
        result = subprocess.call(["scontrol", "requeue", job_id])
    except FileNotFoundError:
        result = -1
    if result == 0:
        rank_zero_info(f"moeframe: requeued SLURM job {job_id}")
    else:
        rank_zero_warn(f"requeuing SLURM job {job_id} failed (scontrol exit status {result}); resubmit it to resume")


def ensure_reliability_callback(trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> Reliability:
    """The run's Reliability callback, added when the config lacks one (called from a module's
    ``setup``, which runs after the callbacks' own ``setup``: hence called here). moeframe's
    modules attach it through ``configure_callbacks``; this stays for other modules."""
    for callback in trainer.callbacks:
        if isinstance(callback, Reliability):
            return callback
    callback = Reliability()
    trainer.callbacks.append(callback)
    callback.setup(trainer, pl_module, stage)
    return callback
