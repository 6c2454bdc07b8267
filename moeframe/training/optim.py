"""AdamW parameter groups and learning-rate schedules.

Weight decay only applies to matrices that are not embeddings: decaying norm scales, biases or
token embeddings pulls them towards zero for no regularisation benefit (standard since GPT-2;
DeepSeek-V3 uses weight decay 0.1 with AdamW β = (0.9, 0.95)).
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import nn

from moeframe.config import OptimConfig
from moeframe.schedules import piecewise


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: decayed matrices, and everything else (norms, biases, embeddings)."""
    embedding_params = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 and id(p) not in embedding_params else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def lr_multiplier(step: int, total_steps: int, optim: OptimConfig) -> float:
    """The factor on ``optim.lr`` at optimizer step ``step`` (0-based) of ``total_steps``."""
    if optim.warmup_steps and step < optim.warmup_steps:
        return (step + 1) / optim.warmup_steps
    if optim.schedule == "constant":
        return 1.0
    floor = optim.min_lr_ratio
    if optim.schedule == "cosine":
        span = max(1, total_steps - optim.warmup_steps)
        progress = min(1.0, (step - optim.warmup_steps) / span)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    # wsd: warm-up, stable at peak, then linear decay over the final decay_fraction of the run
    decay_steps = max(1, round(total_steps * optim.decay_fraction))
    decay_start = max(optim.warmup_steps, total_steps - decay_steps)
    if step < decay_start:
        return 1.0
    progress = min(1.0, (step - decay_start) / decay_steps)
    return 1.0 - (1 - floor) * progress


def build_optimizer(
    model: nn.Module, optim: OptimConfig, total_steps: int, tokens_seen: Optional[Callable[[], float]] = None
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW and its LR schedule: by step, or by tokens seen when ``optim.token_schedule`` is set
    (``tokens_seen`` then reports the run's count whenever the scheduler steps)."""
    optimizer = torch.optim.AdamW(
        param_groups(model, optim.weight_decay), lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps
    )
    if optim.token_schedule is not None:
        if tokens_seen is None:
            raise ValueError("a token schedule needs the run's tokens_seen")
        segments = optim.token_schedule
        factor = lambda step: piecewise(tokens_seen(), 0.0, segments) / optim.lr  # noqa: E731
    else:
        factor = lambda step: lr_multiplier(step, total_steps, optim)  # noqa: E731
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
