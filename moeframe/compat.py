"""Every use of a private Lightning or torch API in moeframe and its plugins, in one place.

Where Lightning or torch offer no public way to do something moeframe needs, the private access
lives here, one small function (or, for an override, one mixin) each, with the version it was
written against. ``tests/test_compat.py`` exercises each against the installed versions, so an
upgrade that moves or renames the private attribute fails there, loudly and by name, rather than
deep inside a training run. ``tests/test_private_api.py`` fails when a private access appears
anywhere else (or, in the plugins, beyond the few it names).

Written against torch 2.13 and Lightning 2.6.6.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, ClassVar

import torch
from torch import nn

__all__ = ["KeepsFP32Buffers", "capture_scalar_outputs", "ddp_ignore", "flush_step_metrics", "set_logger_step"]


def ddp_ignore(module: nn.Module, names: list[str]) -> None:
    """Add ``names`` (qualified parameter/buffer names of ``module``) to the ones
    ``DistributedDataParallel`` neither all-reduces nor broadcasts. torch 2.13: DDP reads the list
    from the module attribute ``_ddp_params_and_buffers_to_ignore`` when it wraps the module
    (what its private ``_set_params_and_buffers_to_ignore_for_model`` writes)."""
    already = list(getattr(module, "_ddp_params_and_buffers_to_ignore", []))
    module._ddp_params_and_buffers_to_ignore = already + [n for n in names if n not in already]


def capture_scalar_outputs() -> AbstractContextManager[None]:
    """While active, ``torch.compile`` traces a scalar read from a tensor (``.tolist()``,
    ``.item()``) as a symbolic integer of the graph instead of breaking the graph there; code that
    branches on such a value still breaks the graph as before. Expert parallelism needs it: its
    all-to-all split sizes come from the routing. torch 2.13: ``torch._dynamo.config.
    capture_scalar_outputs`` (thread-local while patched), no public switch."""
    return torch._dynamo.config.patch(capture_scalar_outputs=True)


def set_logger_step(trainer: Any, step: int) -> None:
    """Set the step Lightning hands the loggers (``self.log``'s x axis). Lightning 2.6.6 keeps it in
    ``trainer.fit_loop.epoch_loop._batches_that_stepped`` and offers no setter."""
    trainer.fit_loop.epoch_loop._batches_that_stepped = step


def flush_step_metrics(trainer: Any) -> None:
    """Send the metrics logged during the current training step to the loggers now (Lightning
    sends them after ``on_train_batch_end``; a callback that ends the run there would lose them).
    Lightning 2.6.6: ``trainer._logger_connector.update_train_step_metrics()``."""
    trainer._logger_connector.update_train_step_metrics()


class KeepsFP32Buffers(nn.Module):
    """Mixin: the buffers named in ``fp32_buffers`` stay float32, and exact, when the module is
    cast (``module.to(torch.bfloat16)``, Lightning's ``bf16-true``, ``.half()``); device moves
    still move them. Their state-dict keys and dtype do not change. torch 2.13: every cast and
    move of a module's tensors goes through ``nn.Module._apply``, overridden here; torch has no
    public way to exempt one tensor from a module cast (``to`` is not called on submodules)."""

    fp32_buffers: ClassVar[tuple[str, ...]] = ()

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> KeepsFP32Buffers:
        originals = {name: getattr(self, name) for name in self.fp32_buffers}
        super()._apply(fn, recurse)
        for name, original in originals.items():
            moved = getattr(self, name)
            if moved.dtype != torch.float32:  # cast: take the fp32 original, not the rounded copy
                fp32 = moved.float() if original.is_meta else original.to(device=moved.device, dtype=torch.float32)
                setattr(self, name, fp32)
        return self
