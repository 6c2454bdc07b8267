"""``ModelThroughput``: tokens/s, achieved model FLOP/s, MFU, and an on-demand step-time breakdown.

Why not only Lightning's ``ThroughputMonitor`` (which moeframe configs keep as ``TokenThroughput``,
for its standard ``train/device/items_per_sec`` names): it knows no H200, B200 or FP8 peak, it
cannot take a peak for a CPU, it measures micro-batches rather than optimizer steps, and it has no
breakdown. This callback complements it:

- per optimizer step, averaged over the last ``window`` steps: ``perf/tokens_per_sec`` (all
  ranks), ``perf/tokens_per_sec_per_device``, ``perf/model_flops_per_sec_per_device`` (model
  FLOPs from ``LightningModule.flops_per_batch``, which ``PretrainModule`` sets for every
  micro-batch from the parameter shapes: 6·activated matmul parameters per token plus causal
  attention; the ranks of one pipeline share a micro-batch, its tokens and its FLOPs), ``perf/mfu`` (achieved / peak, when a peak is known) and ``perf/step_time_s``.
  Time runs from one optimizer step's end to the next, so data loading is included; validation
  pauses the clock.
- the breakdown, every ``breakdown_every_n_steps`` optimizer steps (0: never), in ms per step:
  ``perf/time/data_wait_ms`` (between one micro-batch's end and the next one's start),
  ``forward_ms``, ``backward_ms``, ``optimizer_ms`` (clipping, step, zero_grad), and inside the
  forward ``forward_attention_ms``, ``forward_router_ms``, ``forward_moe_dispatch_ms`` (sort,
  gather, weighted scatter back), ``forward_moe_experts_ms`` (the grouped GEMMs) and
  ``forward_shared_experts_ms``. Module timers are forward hooks installed for that step only and
  removed after it, and the experts' phase callback is ``None`` otherwise: a step that is not
  broken down runs exactly the normal code. On CUDA the breakdown synchronises at every boundary
  (so the breakdown step itself is slower); recomputation by activation checkpointing, which runs
  the forward again inside backward, is counted in backward.

Logged straight to the trainer's loggers by rank 0 every ``log_every_n_steps`` optimizer steps
(breakdown steps always), at the index of the step that just ended.

Peak FLOP/s per device: ``peak_flops`` if given; else the dense (no 2:4 sparsity) tensor-core
peak of a known GPU at the run's precision (``bf16`` or ``fp8``, read from the precision plugin
or given as ``precision``); else (a CPU, an unknown GPU, fp32) a *measured* peak: the best of a
few square matrix products in the run's GEMM dtype (float32, bfloat16 or float16; FP8 runs
measure bfloat16), taken once per processor (model and feature flags) or GPU, core and thread
count, torch version and dtype, and cached in ``$MOEFRAME_CACHE`` (default ``~/.cache/moeframe``)
``/peak_flops.json``. One info line says which peak was used. A measured peak is what this machine's GEMM library reaches on a
large product, not a datasheet figure: the MFU against it says how close the run comes to the
fastest GEMMs it could run. ``measure_peak=False`` turns the measurement off (no MFU then).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from moeframe.layout import data_parallel_rank_size
from moeframe.model.recompute import is_recomputing

Precision = Literal["bf16", "fp8"]

# Dense tensor-core peaks per GPU in FLOP/s (without 2:4 structured sparsity, which NVIDIA's
# headline figures double). H100 SXM and H200 SXM share the GH100 compute: 989.4 TFLOP/s BF16,
# 1,978.9 TFLOP/s FP8 (datasheet: 1,979 / 3,958 "with sparsity"; per-precision dense table:
# https://hmc-tech.com/gpu/nvidia-gb200-vs-nvidia-h100-sxm, H200 dense figures:
# https://itkb.uw.cz/2026/06/nvidia-h200-vs-b300-precisions-cores.html). B200 (HGX, 1,000 W):
# 2,250 TFLOP/s BF16, 4,500 TFLOP/s FP8 dense, 4,500 / 9,000 sparse (from NVIDIA's Blackwell
# brief as tabulated at https://glennklockwood.com/garden/processors/B200).
PEAK_FLOPS: dict[tuple[str, str], float] = {
    ("h100-sxm", "bf16"): 989.4e12,
    ("h100-sxm", "fp8"): 1978.9e12,
    ("h200", "bf16"): 989.4e12,
    ("h200", "fp8"): 1978.9e12,
    ("b200", "bf16"): 2250e12,
    ("b200", "fp8"): 4500e12,
}


def gpu_family(device_name: str) -> str | None:
    """The ``PEAK_FLOPS`` family of a CUDA device name (``torch.cuda.get_device_name``), or None.
    H100 PCIe/NVL boards have lower clocks and are not the SXM figures, so they are not matched."""
    name = device_name.lower()
    if "h200" in name:
        return "h200"
    if "b200" in name:
        return "b200"
    if "h100" in name and "pcie" not in name and "nvl" not in name:
        return "h100-sxm"
    return None


def precision_of(plugin: Any) -> Precision | None:
    """``fp8`` for an FP8 precision plugin (any plugin whose class or precision names fp8 or
    Transformer Engine), ``bf16`` for bf16 precisions, None for fp32/fp16 (no built-in peak)."""
    names = f"{type(plugin).__name__} {getattr(plugin, 'precision', '')}".lower()
    if "fp8" in names or "transformerengine" in names or "transformer-engine" in names:
        return "fp8"
    if "bf16" in names:
        return "bf16"
    return None


def builtin_peak(device: torch.device, precision: str | None) -> float | None:
    """The built-in dense peak FLOP/s of ``device`` at ``precision``, or None."""
    if device.type != "cuda" or precision is None:
        return None
    family = gpu_family(torch.cuda.get_device_name(device))
    return None if family is None else PEAK_FLOPS.get((family, precision))


# -- a measured peak where none is built in -----------------------------------------------------------
def gemm_dtype(trainer_precision: str, precision: str | None) -> torch.dtype:
    """The dtype the run's matrix products use: bf16 for bf16 and FP8 runs (FP8's non-expert GEMMs
    and this measurement's stand-in), fp16 for fp16, else float32."""
    if precision in ("bf16", "fp8") or "bf16" in trainer_precision:
        return torch.bfloat16
    if trainer_precision.startswith("16"):
        return torch.float16
    return torch.float32


def peak_cache_file() -> Path:
    return Path(os.environ.get("MOEFRAME_CACHE") or Path.home() / ".cache" / "moeframe") / "peak_flops.json"


# Entries are keyed by what changes a GEMM rate: the processor (model name and a digest of its
# feature flags: a VM moved to another CPU generation keeps its host name and often its model
# name, not its flags), core and thread counts, the torch build (its BLAS/oneDNN), the dtype and
# the product size. Keys of another format (the first cache also held the host name and no CPU
# model) are dropped when the file is next written.
CACHE_FORMAT = "v2"


def cpu_description() -> str:
    """``<model name> (flags <digest>), <cores> cores``, from /proc/cpuinfo where there is one."""
    model, flags = platform.processor() or platform.machine(), ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and value.strip():
                model = value.strip()
            elif key.strip() in ("flags", "Features") and not flags:
                flags = hashlib.sha256(" ".join(sorted(value.split())).encode()).hexdigest()[:8]
    except OSError:  # no /proc (macOS, Windows): the platform's processor name alone
        pass
    return f"{model}{f' (flags {flags})' if flags else ''}, {os.cpu_count()} cores"


def _machine_key(device: torch.device, dtype: torch.dtype, size: int) -> str:
    if device.type == "cuda":
        name = f"{torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}"
    else:
        name = f"{cpu_description()}, {torch.get_num_threads()} threads"
    dtype_name = str(dtype).removeprefix("torch.")
    return f"{CACHE_FORMAT} | {device.type}: {name} | torch {torch.__version__} | {dtype_name} | {size}^3"


def measure_gemm_peak(device: torch.device, dtype: torch.dtype, size: int = 2048, repeats: int = 3) -> float:
    """FLOP/s of the best of ``repeats`` ``size``³ products (after one warm-up) in ``dtype``."""
    return measure_gemm_peaks(device, (dtype,), size, repeats)[dtype]


def measure_gemm_peaks(
    device: torch.device, dtypes: tuple[torch.dtype, ...], size: int = 2048, repeats: int = 3
) -> dict[torch.dtype, float]:
    """FLOP/s per dtype of the best of ``repeats`` ``size``³ products (after one warm-up each).
    The dtypes take turns product by product, so that a machine whose load changes during the
    measurement slows them alike: their ratio is what a precision choice compares."""
    # a private generator: measuring must not advance the run's RNG, or a run that measured (empty
    # cache) and its resumed twin (cache filled) would draw different random numbers afterwards
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, device=device, generator=generator)
    b = torch.randn(size, size, device=device, generator=generator)
    operands = {dtype: (a.to(dtype), b.to(dtype)) for dtype in dtypes}
    best = dict.fromkeys(dtypes, float("inf"))
    for i in range(repeats + 1):
        for dtype, (x, y) in operands.items():
            seconds = _time_product(device, x, y)
            if i:  # the first product builds kernels and warms caches
                best[dtype] = min(best[dtype], seconds)
    return {dtype: 2 * size**3 / seconds for dtype, seconds in best.items()}


def _time_product(device: torch.device, x: torch.Tensor, y: torch.Tensor) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    x @ y
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def _read_peak_cache() -> dict[str, float]:
    try:
        cache = json.loads(peak_cache_file().read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(cache, dict):
        return {}
    prefix = f"{CACHE_FORMAT} | "
    return {k: float(v) for k, v in cache.items() if k.startswith(prefix) and isinstance(v, (int, float)) and v > 0}


def _write_peak_cache(cache: dict[str, float]) -> None:
    path = peak_cache_file()
    try:  # written whole, then renamed: a concurrent reader never sees half a file
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache, indent=1, sort_keys=True))
        tmp.replace(path)
    except OSError as exc:
        rank_zero_warn(f"could not cache the measured GEMM peak in {path} ({exc}); it is measured again next run")


def cached_gemm_peaks(
    device: torch.device, dtypes: tuple[torch.dtype, ...], size: int = 2048
) -> tuple[dict[torch.dtype, float], bool]:
    """``({dtype: peak FLOP/s}, measured now)``: from the per-machine cache when every dtype is
    there, else all of them measured now, side by side (:func:`measure_gemm_peaks`), and stored."""
    cache = _read_peak_cache()
    keys = {dtype: _machine_key(device, dtype, size) for dtype in dtypes}
    if all(key in cache for key in keys.values()):
        return {dtype: cache[key] for dtype, key in keys.items()}, False
    peaks = measure_gemm_peaks(device, dtypes, size)
    cache.update({keys[dtype]: peak for dtype, peak in peaks.items()})
    _write_peak_cache(cache)
    return peaks, True


def cached_gemm_peak(device: torch.device, dtype: torch.dtype, size: int = 2048) -> tuple[float, bool]:
    """``(peak FLOP/s, measured now)``: from the per-machine cache, else measured and stored."""
    peaks, fresh = cached_gemm_peaks(device, (dtype,), size)
    return peaks[dtype], fresh


class _StepTimer:
    """Wall-clock boundaries of one optimizer step, with a device sync on CUDA."""

    def __init__(self, device: torch.device) -> None:
        self.sync: Callable[[], None] = (
            (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
        )

    def now(self) -> float:
        self.sync()
        return time.perf_counter()


class _ForwardBreakdown:
    """Forward hooks on attention, router, experts and shared experts, plus the experts' phase
    callback; installed for one step, then removed."""

    def __init__(self, model: torch.nn.Module, clock: _StepTimer) -> None:
        from moeframe.model.base import AttentionBase, ExpertsBase, RouterBase
        from moeframe.model.moe import MoE

        self.clock, self.totals = clock, {}
        self._phased: list[ExpertsBase] = []  # experts that mark their own phases (marks_phases)
        self._handles: list[Any] = []
        self._phase: tuple[str, float] | None = None
        kinds: list[tuple[str, torch.nn.Module]] = []
        for m in model.modules():
            if isinstance(m, AttentionBase):
                kinds.append(("forward_attention", m))
            elif isinstance(m, RouterBase):
                kinds.append(("forward_router", m))
            elif isinstance(m, ExpertsBase) and m.marks_phases:
                self._phased.append(m)
            elif isinstance(m, ExpertsBase):
                kinds.append(("forward_moe_experts", m))  # an experts plugin without phase marks
            elif isinstance(m, MoE) and m.shared_experts is not None:
                kinds.append(("forward_shared_experts", m.shared_experts))
        for key, module in kinds:
            self._handles.append(module.register_forward_pre_hook(self._start(key)))
            self._handles.append(module.register_forward_hook(self._stop(key)))
        self._starts: dict[str, float] = {}
        for m in self._phased:
            m.set_phase_timer(self._mark_phase)

    @staticmethod
    def _in_backward() -> bool:
        return is_recomputing()  # an activation-checkpoint recompute (moeframe.model.recompute)

    def _add(self, key: str, seconds: float) -> None:
        self.totals[key] = self.totals.get(key, 0.0) + seconds

    def _start(self, key: str) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: Any) -> None:
            if not self._in_backward():
                self._starts[key] = self.clock.now()

        return hook

    def _stop(self, key: str) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: Any, output: Any) -> None:
            if not self._in_backward() and key in self._starts:
                self._add(key, self.clock.now() - self._starts.pop(key))

        return hook

    def _mark_phase(self, name: str | None) -> None:
        if self._in_backward():
            return
        now = self.clock.now()
        if self._phase is not None:
            self._add(f"forward_{self._phase[0]}", now - self._phase[1])
        self._phase = None if name is None else (name, now)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        for m in self._phased:
            m.set_phase_timer(None)


class ModelThroughput(Callback):
    """Tokens/s, model FLOP/s and MFU per optimizer step, and an on-demand step-time breakdown
    (see the module docstring).

    Args:
        peak_flops: peak FLOP/s of ONE device for the MFU denominator (e.g. ``989.4e12``); needed on
            a CPU or an unlisted GPU, overrides the built-in table otherwise.
        precision: ``bf16`` or ``fp8``: which built-in peak applies; default: from the precision plugin.
        window: optimizer steps averaged in each logged value.
        breakdown_every_n_steps: measure the breakdown every N optimizer steps (0: never).
        measure_peak: where no peak is given or built in, measure one (cached per machine) and log
            MFU against it; False: no MFU there.
    """

    def __init__(
        self,
        peak_flops: float | None = None,
        precision: Precision | None = None,
        window: int = 10,
        breakdown_every_n_steps: int = 0,
        measure_peak: bool = True,
    ) -> None:
        if peak_flops is not None and peak_flops <= 0:
            raise ValueError(f"peak_flops must be > 0 (FLOP/s of one device), got {peak_flops}")
        if precision not in (None, "bf16", "fp8"):
            raise ValueError(f"precision must be bf16 or fp8 (or unset: read from the trainer), got {precision!r}")
        if window < 1 or breakdown_every_n_steps < 0:
            raise ValueError(
                f"window must be >= 1 and breakdown_every_n_steps >= 0, got {window}, {breakdown_every_n_steps}"
            )
        self.user_peak, self.user_precision, self.measure_peak = peak_flops, precision, measure_peak
        self.window, self.breakdown_every = window, breakdown_every_n_steps
        self.peak_flops: float | None = None
        self._steps: deque[tuple[float, int, int]] = deque(maxlen=window)  # (seconds, tokens, flops)
        self._reset_step()
        self._step_start: float | None = None
        self._last_batch_end: float | None = None
        self._paused_at: float | None = None
        self._last_global_step = 0
        self._breakdown: _ForwardBreakdown | None = None
        self._phase_start: dict[str, float] = {}
        self._times: dict[str, float] = {}

    # -- setup ----------------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        device = trainer.strategy.root_device
        self.clock = _StepTimer(device)
        precision = self.user_precision or precision_of(trainer.precision_plugin)
        self.peak_flops = self.user_peak or builtin_peak(device, precision)
        if self.peak_flops is None:
            where = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
            if self.measure_peak:
                dtype = gemm_dtype(str(trainer.precision), precision)
                self.peak_flops, fresh = cached_gemm_peak(device, dtype)
                how = "measured now" if fresh else "measured before"
                rank_zero_info(
                    f"ModelThroughput: no built-in peak for {where}; perf/mfu uses a measured peak of "
                    f"{self.peak_flops / 1e9:,.1f} GFLOP/s (2048^3 {str(dtype).removeprefix('torch.')} "
                    f"matmul, {how}, cached in {peak_cache_file()})"
                )
            else:
                rank_zero_info(
                    f"ModelThroughput: no built-in peak for {where} at precision {precision or 'fp32/fp16'}; "
                    "MFU is not logged (set ModelThroughput(peak_flops=...) to log it)"
                )
        if not hasattr(pl_module, "flops_per_batch"):
            rank_zero_warn("ModelThroughput: the LightningModule has no flops_per_batch; FLOP/s and MFU are not logged")

    def _reset_step(self) -> None:
        self._tokens = 0
        self._flops = 0
        self._flops_known = True

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last_global_step = trainer.global_step
        self._step_start = self._last_batch_end = None

    # -- per micro-batch ------------------------------------------------------------------------
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        now = time.perf_counter()
        if self._step_start is None:  # the first step of this fit (or after a resume)
            self._step_start = now
        if self._breakdown_step(trainer) and self._breakdown is None:
            self._times = {}
            self._breakdown = _ForwardBreakdown(pl_module, self.clock)
        if self._breakdown is not None:
            if self._last_batch_end is not None:
                self._add_time("data_wait", now - self._last_batch_end)
            self._phase_start["forward"] = self.clock.now()

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        if self._breakdown is not None:
            now = self.clock.now()
            self._add_time("forward", now - self._phase_start.pop("forward", now))
            self._phase_start["backward"] = now

    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._breakdown is not None:
            now = self.clock.now()
            self._add_time("backward", now - self._phase_start.pop("backward", now))

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        if self._breakdown is not None:
            self._phase_start["optimizer"] = self.clock.now()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._tokens += int(batch["input_ids"].numel()) * data_parallel_rank_size(trainer)[1]  # replicas
        flops = getattr(pl_module, "flops_per_batch", None)
        if flops is None:
            self._flops_known = False
        else:
            self._flops += int(flops)
        if self._breakdown is not None and "optimizer" in self._phase_start:
            self._add_time("optimizer", self.clock.now() - self._phase_start.pop("optimizer"))
        stepped = trainer.global_step != self._last_global_step  # the optimizer stepped in this batch
        self._last_global_step = trainer.global_step
        if stepped:
            self._end_step(trainer, pl_module)
        self._last_batch_end = time.perf_counter()

    def _breakdown_step(self, trainer: L.Trainer) -> bool:
        return self.breakdown_every > 0 and trainer.global_step % self.breakdown_every == 0

    def _add_time(self, key: str, seconds: float) -> None:
        self._times[key] = self._times.get(key, 0.0) + seconds

    # -- per optimizer step ---------------------------------------------------------------------
    def _end_step(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        now = self.clock.now()
        assert self._step_start is not None
        self._steps.append((now - self._step_start, self._tokens, self._flops if self._flops_known else -1))
        self._step_start = now
        self._reset_step()
        metrics = self.metrics(trainer.world_size)
        broken_down = self._breakdown is not None
        if self._breakdown is not None:
            self._breakdown.remove()
            self._times.update(self._breakdown.totals)
            metrics.update({f"perf/time/{k}_ms": v * 1e3 for k, v in self._times.items()})
            self._breakdown = None
        # straight to the loggers (rank 0), as Lightning's ThroughputMonitor does: the breakdown keys
        # exist only on breakdown steps, and self.log would repeat their last values on other steps
        step = trainer.global_step - 1  # the index of the step that just ended, as Lightning logs it
        if trainer.is_global_zero and (broken_down or trainer.global_step % trainer.log_every_n_steps == 0):
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)

    def metrics(self, world_size: int) -> dict[str, float]:
        """The logged quantities over the current window."""
        seconds = sum(s for s, _, _ in self._steps)
        tokens = sum(t for _, t, _ in self._steps)
        out = {
            "perf/step_time_s": seconds / len(self._steps),
            "perf/tokens_per_sec": tokens / seconds,
            "perf/tokens_per_sec_per_device": tokens / seconds / world_size,
        }
        if all(f >= 0 for _, _, f in self._steps):
            flops_per_device = sum(f for _, _, f in self._steps) / seconds
            out["perf/model_flops_per_sec_per_device"] = flops_per_device
            if self.peak_flops:
                out["perf/mfu"] = flops_per_device / self.peak_flops
        return out

    # -- pauses ---------------------------------------------------------------------------------
    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._paused_at = time.perf_counter()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._paused_at is not None and self._step_start is not None:
            paused = time.perf_counter() - self._paused_at
            self._step_start += paused  # validation is not training time
            if self._last_batch_end is not None:
                self._last_batch_end += paused
        self._paused_at = None

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._breakdown is not None:
            self._breakdown.remove()
            self._breakdown = None
