"""``FP8Precision``: DeepSeek-V3's FP8 training as a Lightning precision plugin (registered ``fp8``).

One plugin for every strategy, because a Trainer receives its plugins before it knows which
strategy will run them:

- single device and DDP: the model keeps fp32 master weights; outside the FP8 GEMMs it computes
  under ``torch.autocast(bfloat16)``, exactly like ``precision="bf16-mixed"``; the backward,
  optimizer step and gradient clipping are Lightning's defaults.
- DeepSpeed (``zero1``/``zero2``/``zero3`` presets, or any ``DeepSpeedStrategy``): Lightning's
  DeepSpeedStrategy drives backward and the optimizer step through its precision plugin, which
  therefore must be a ``DeepSpeedPrecision``; this class is one, with precision ``bf16-mixed``, so
  the engine runs the model in BF16 and DeepSpeed's optimizer holds the fp32 master weights (and
  clips gradients, from ``gradient_clip_val``).

Which of the two applies is decided in ``convert_module``, the hook every strategy calls on the
LightningModule before it wraps it (DDP, DeepSpeed engine): the module knows its Trainer and so
the strategy. That hook also swaps the selected Linears for ``FP8Linear`` (same parameters) and installs
an ``FP8GroupedGemm`` in the routed experts, so
the conversion happens exactly once per run, before any optimizer or engine holds the model.

Options (all validated at construction, before anything is built):

- ``modules``/``exclude``: fnmatch patterns over module names (see ``moeframe_fp8.convert``);
  default every Linear the model does not declare high precision.
- ``scale_format``: ``fp32`` (scale = amax/448) or ``pow2`` (rounded up to a power of two).
- ``backend``: ``auto`` (``hopper`` on a capability-9.0 GPU if it agrees with ``emulated`` on a few
  probe tiles at start-up, else ``emulated``), ``emulated``,
  ``hopper`` (an error naming the requirement when it cannot run).
- ``bf16_moments``: keep the optimizer's Adam moments in BF16 between steps (DeepSeek-V3); the
  update itself is computed in fp32.
- ``stats_every_n_steps``: every n optimizer steps, log per-layer FP8 statistics (amax, scale
  range, underflow and overflow fractions of x, W and dy) to the Trainer's loggers; 0 = never.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Literal

import torch
from lightning.pytorch.plugins.precision import DeepSpeedPrecision, Precision
from lightning.pytorch.utilities import GradClipAlgorithmType, rank_zero_info, rank_zero_warn
from torch import nn
from torch.optim import Optimizer

from moeframe.plugin import DescribesMemory, TrainingBytes
from moeframe_fp8.convert import FP8Module, convert_to_fp8, converted_modules
from moeframe_fp8.gemm import BACKENDS, GemmFn, disagreement, gemm_hopper, hopper_available
from moeframe_fp8.grouped import FP8GroupedGemm
from moeframe_fp8.linear import FP8ConfigError, FP8Recipe

__all__ = ["FP8Precision", "checked_backend", "resolve_backend", "MOMENT_KEYS"]

SCALE_FORMATS = ("fp32", "pow2")
MOMENT_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def resolve_backend(backend: str, device: torch.device) -> Literal["emulated", "hopper"]:
    """The backend that runs on ``device``; ``hopper`` where it cannot run is an FP8ConfigError.
    ``auto`` takes ``hopper`` only where it agrees with ``emulated`` (see :func:`checked_backend`)."""
    usable, why = hopper_available(device)
    if backend == "auto":
        return checked_backend("hopper", gemm_hopper, device) if usable else "emulated"
    if backend == "hopper" and not usable:
        raise FP8ConfigError(
            f"fp8 backend 'hopper' cannot run: {why}. Use backend 'emulated' (any device, same "
            "quantisation, slow) or 'auto' (hopper where available)"
        )
    return backend  # type: ignore[return-value]


def checked_backend(name: Literal["hopper"], candidate: GemmFn, device: torch.device) -> Literal["emulated", "hopper"]:
    """``name`` if ``candidate`` (its GEMM) matches the emulated GEMM on a few probe tiles on
    ``device``, else ``emulated`` with one warning naming the disagreement. ``auto`` runs this at
    start-up until a GPU run has verified ``hopper`` (benchmarks/fp8_linear.py on an H100/H200);
    an explicit ``backend: hopper`` is the user's choice and is not second-guessed."""
    problem = disagreement(candidate, device)
    if problem is None:
        return name
    rank_zero_warn(
        f"fp8: backend 'auto' falls back to 'emulated' (slow): '{name}' disagrees with 'emulated' on "
        f"{problem}. Report it with your GPU and torch version; set backend: emulated to skip this check"
    )
    return "emulated"


def _unsupported_strategy(strategy: Any) -> str | None:
    """A strategy that shards parameters as DTensors (FSDP) would hand the FP8 GEMMs shards."""
    from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

    if isinstance(strategy, (FSDPStrategy, ModelParallelStrategy)):
        return type(strategy).__name__
    return None


class FP8Precision(DeepSpeedPrecision, DescribesMemory):
    """DeepSeek-V3 fine-grained FP8 training (E4M3, 1×128 / 128×128 scaling) for Lightning.

    Args:
        modules: fnmatch patterns of the modules to convert (default: every eligible Linear).
        exclude: fnmatch patterns of modules to leave alone.
        scale_format: ``fp32`` or ``pow2``.
        backend: ``auto``, ``emulated`` or ``hopper``.
        bf16_moments: store Adam/AdamW moments in BF16 between optimizer steps.
        stats_every_n_steps: log per-layer FP8 statistics every n optimizer steps (0: never).
    """

    plugin_api = "1"  # the moeframe plugin API this class is written against

    @classmethod
    def training_bytes(cls) -> TrainingBytes:
        """For ``moeframe inspect --precision fp8``: FP8 weights, fp32 masters, and AdamW moments in
        BF16 as the V3 recipe keeps them (``bf16_moments: true``)."""
        return TrainingBytes(weights=1, master=4, moment=2)

    def __init__(
        self,
        modules: list[str] | None = None,
        exclude: list[str] | None = None,
        scale_format: Literal["fp32", "pow2"] = "fp32",
        backend: Literal["auto", "emulated", "hopper"] = "auto",
        bf16_moments: bool = False,
        stats_every_n_steps: int = 0,
    ) -> None:
        if scale_format not in SCALE_FORMATS:
            raise FP8ConfigError(f"fp8: scale_format must be one of {SCALE_FORMATS}, got {scale_format!r}")
        if backend not in BACKENDS:
            raise FP8ConfigError(f"fp8: backend must be one of {BACKENDS}, got {backend!r}")
        if isinstance(stats_every_n_steps, bool) or not isinstance(stats_every_n_steps, int) or stats_every_n_steps < 0:
            raise FP8ConfigError(
                f"fp8: stats_every_n_steps must be an integer >= 0 (0 = never), got {stats_every_n_steps!r}"
            )
        for option, value in (("modules", modules), ("exclude", exclude)):
            if value is not None and (isinstance(value, str) or not all(isinstance(p, str) and p for p in value)):
                raise FP8ConfigError(f"fp8: {option} must be a list of non-empty name patterns, got {value!r}")
        if modules is not None and not modules:
            raise FP8ConfigError("fp8: modules=[] converts nothing; leave it unset for the default selection")
        super().__init__("bf16-mixed")
        self.modules, self.exclude = modules, list(exclude or [])
        self.scale_format, self.backend = scale_format, backend
        self.bf16_moments, self.stats_every_n_steps = bf16_moments, stats_every_n_steps
        self.fp8_modules: dict[str, FP8Module] = {}
        self._deepspeed = False
        self._device_type = "cpu"
        self._hooked: set[int] = set()

    # -- conversion ----------------------------------------------------------------------------
    def convert_module(self, module: nn.Module) -> nn.Module:
        trainer = getattr(module, "_trainer", None)
        strategy = trainer.strategy if trainer is not None else None
        device = strategy.root_device if strategy is not None else _first_device(module)
        if strategy is not None:
            from lightning.pytorch.strategies import DeepSpeedStrategy

            unsupported = _unsupported_strategy(strategy)
            if unsupported:
                raise FP8ConfigError(
                    f"fp8 runs under single-device, DDP and DeepSpeed strategies; {unsupported} shards "
                    "parameters into DTensors, which the FP8 GEMMs do not take. Use zero1/zero2/zero3 "
                    "for sharded training with fp8"
                )
            self._deepspeed = isinstance(strategy, DeepSpeedStrategy)
        self._device_type = device.type
        recipe = FP8Recipe(power_of_two=self.scale_format == "pow2", backend=resolve_backend(self.backend, device))
        already = bool(converted_modules(module))
        self.fp8_modules = convert_to_fp8(module, recipe, self.modules, self.exclude)
        if not self.fp8_modules:
            rank_zero_warn(
                f"fp8: no module was converted in {type(module).__name__} (no eligible nn.Linear or "
                "routed experts): training runs without FP8 GEMMs"
            )
        elif not already:
            names = list(self.fp8_modules)
            experts = sum(isinstance(m, FP8GroupedGemm) for m in self.fp8_modules.values())
            rank_zero_info(
                f"fp8: {len(names) - experts} Linear layers and {experts} routed-expert modules run their "
                f"GEMMs in FP8 E4M3 (backend {recipe.backend}, scale {self.scale_format}, "
                f"{'DeepSpeed bf16 engine' if self._deepspeed else 'bf16 autocast'} outside them): "
                f"{', '.join(names[:4])}{', ...' if len(names) > 4 else ''}"
            )
        return module

    # -- single device / DDP: bf16-mixed outside the FP8 GEMMs ------------------------------------
    def forward_context(self) -> AbstractContextManager:
        if self._deepspeed:
            return nullcontext()
        return torch.autocast(self._device_type, dtype=torch.bfloat16)

    def convert_input(self, data: Any) -> Any:
        return super().convert_input(data) if self._deepspeed else data

    def backward(self, tensor: torch.Tensor, model: Any, optimizer: Any, *args: Any, **kwargs: Any) -> None:
        if self._deepspeed:
            return super().backward(tensor, model, optimizer, *args, **kwargs)
        return Precision.backward(self, tensor, model, optimizer, *args, **kwargs)

    def clip_gradients(
        self,
        optimizer: Optimizer,
        clip_val: int | float = 0.0,
        gradient_clip_algorithm: GradClipAlgorithmType = GradClipAlgorithmType.NORM,
    ) -> None:
        if self._deepspeed:
            return super().clip_gradients(optimizer, clip_val, gradient_clip_algorithm)
        return Precision.clip_gradients(self, optimizer, clip_val, gradient_clip_algorithm)

    def optimizer_step(self, optimizer: Any, model: Any, closure: Callable[[], Any], **kwargs: Any) -> Any:
        if self.bf16_moments:
            self._hook_bf16_moments(optimizer)
        record = self._stats_due(model)
        if record:
            closure = self._recording(closure, model)
        if self._deepspeed:
            return super().optimizer_step(optimizer, model, closure, **kwargs)
        return Precision.optimizer_step(self, optimizer, model, closure, **kwargs)

    # -- BF16 optimizer moments ----------------------------------------------------------------------
    def _hook_bf16_moments(self, optimizer: Any) -> None:
        """Moments live in BF16 between steps; each step upcasts them to fp32, updates, and stores
        them back in BF16. Hooked on the torch optimizer itself, so it also holds when DeepSpeed
        wraps it (ZeRO steps the wrapped optimizer on its fp32 partitions)."""
        inner = optimizer
        while not isinstance(inner, Optimizer) and hasattr(inner, "optimizer"):  # DeepSpeed's ZeRO wrapper
            inner = inner.optimizer
        if id(inner) in self._hooked or not isinstance(inner, Optimizer):
            return
        if not isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
            rank_zero_warn(f"fp8: bf16_moments applies to Adam/AdamW; {type(inner).__name__} keeps its state as is")
            self._hooked.add(id(inner))
            return
        inner.register_step_pre_hook(lambda opt, args, kwargs: _cast_moments(opt, torch.float32))
        inner.register_step_post_hook(lambda opt, args, kwargs: _cast_moments(opt, torch.bfloat16))
        self._hooked.add(id(inner))

    # -- statistics ----------------------------------------------------------------------------------
    def _stats_due(self, model: Any) -> bool:
        n = self.stats_every_n_steps
        trainer = getattr(model, "_trainer", None)
        return bool(n and self.fp8_modules and trainer is not None and trainer.global_step % n == 0)

    def _recording(self, closure: Callable[[], Any], model: Any) -> Callable[[], Any]:
        """The closure (forward + backward) with every FP8 module recording its statistics."""

        def run() -> Any:
            for m in self.fp8_modules.values():
                m.recorder.enabled, m.recorder.stats = True, {}
            try:
                return closure()
            finally:
                for m in self.fp8_modules.values():
                    m.recorder.enabled = False
                self._log_stats(model)

        return run

    def collect_stats(self) -> dict[str, float]:
        """``fp8/<layer>/<x|w|dy>_<stat>`` from the last recorded step (routed experts:
        ``fp8/<experts>/<w1|w2|w3>.<x|w|dy>_<stat>``)."""
        metrics: dict[str, float] = {}
        for name, m in self.fp8_modules.items():
            for kind, stats in m.recorder.stats.items():
                for key, value in stats.as_dict().items():
                    metrics[f"fp8/{name}/{kind}_{key}"] = value
        return metrics

    def _log_stats(self, model: Any) -> None:
        metrics = self.collect_stats()
        if not metrics:
            return
        trainer = model.trainer
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    def __repr__(self) -> str:
        return (
            f"FP8Precision(backend={self.backend!r}, scale_format={self.scale_format!r}, modules={self.modules!r}, "
            f"exclude={self.exclude!r}, bf16_moments={self.bf16_moments}, "
            f"stats_every_n_steps={self.stats_every_n_steps})"
        )


def _cast_moments(optimizer: Optimizer, dtype: torch.dtype) -> None:
    for state in optimizer.state.values():
        for key in MOMENT_KEYS:
            value = state.get(key)
            if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != dtype:
                state[key] = value.to(dtype)


def _first_device(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")
