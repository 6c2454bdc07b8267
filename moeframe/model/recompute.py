"""Activation checkpointing that tells the recompute apart from the forward.

A non-reentrant ``torch.utils.checkpoint.checkpoint`` runs its function twice: once in the forward
and once more inside backward, to rebuild the activations it did not keep. Code that counts or
times the forward (the MoE layer's routed-token counts, the throughput callback's phase timers)
must skip that second run. torch has no public "is autograd's backward running me" query, but
``checkpoint``'s ``context_fn`` is public: of the two context managers it returns, the second wraps
the recompute only. :func:`activation_checkpoint` enters :func:`recomputing` there, and
:func:`is_recomputing` reads the mark.

Only recomputes started through :func:`activation_checkpoint` are seen: the core's block and
selective checkpointing use it, and a plugin that recomputes a part of its forward uses it too
(``moeframe.plugin.activation_checkpoint``) whenever that part contains a module whose forward is
counted or timed (a router, an experts module, a whole attention or MoE layer).

Under ``torch.compile`` the recompute is part of the compiled backward graph and never re-runs
the Python code, so nothing needs marking there: no ``context_fn`` is passed (dynamo traces none
but a selective-checkpoint policy).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Generator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

__all__ = ["activation_checkpoint", "is_recomputing", "recomputing"]

# per thread: autograd runs a GPU's backward (and so the recompute) on that device's own thread
_state = threading.local()


def is_recomputing() -> bool:
    """True while an :func:`activation_checkpoint` recompute runs on this thread (inside backward)."""
    return getattr(_state, "depth", 0) > 0


@contextmanager
def recomputing() -> Generator[None, None, None]:
    """Mark the code inside as a recompute (nested checkpoints nest)."""
    _state.depth = getattr(_state, "depth", 0) + 1
    try:
        yield
    finally:  # also when torch stops a recompute early, once it has what backward needs
        _state.depth -= 1


def _forward_then_recompute() -> tuple[AbstractContextManager[None], AbstractContextManager[None]]:
    return nullcontext(), recomputing()


def activation_checkpoint(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False, **kwargs)`` whose
    recompute in backward is marked (:func:`is_recomputing`)."""
    if torch.compiler.is_compiling():
        # no context_fn argument at all: dynamo's checkpoint rule rejects a traced one, even torch's noop
        return checkpoint(fn, *args, use_reentrant=False, **kwargs)
    return checkpoint(fn, *args, use_reentrant=False, context_fn=_forward_then_recompute, **kwargs)
