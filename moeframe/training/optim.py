"""Optimizers (AdamW, or Muon for the hidden matrices), their parameter groups and LR schedules.

Weight decay only applies to matrices that are not embeddings: decaying norm scales, biases or
token embeddings pulls them towards zero for no regularisation benefit (standard since GPT-2;
DeepSeek-V3 uses weight decay 0.1 with AdamW β = (0.9, 0.95)).

``optim.optimizer: muon`` (DeepSeek-V4's recipe, Muon per Jordan et al. / Liu et al. 2025): the
hidden matrices (attention and expert projections, router gates, hyper-connection projections)
get Muon's orthogonalised momentum update, rescaled to the RMS ``muon_update_rms`` so that the
AdamW learning rate fits both; embeddings, the output head and every 1-D parameter (norms,
biases, the hyper-connections' bases and scales) keep AdamW. torch's ``torch.optim.Muon`` takes
2-D parameters only, while stacked expert weights are [E, F, D]: :class:`MuonAdamW` runs the same
update (the same Newton-Schulz iteration, in bfloat16 as torch does) over every matrix of a stack
at once, and holds both rules in one optimizer so that schedulers, checkpoints and strategies see
one object. A test checks it against ``torch.optim.Muon`` and ``torch.optim.AdamW``.

DeepSeek-V4's choices (its report, §2.4 Algorithm 1 and the pre-training setup; the values as
re-implemented in public trainers: microsoft/dion PR 67, PaddlePaddle PR 78916, AMD Primus PR 729,
deepmd-kit PR 5424, MaxText PR 4065): a *hybrid* Newton-Schulz schedule of 10 iterations, 8 with
Jordan's aggressive coefficients (3.4445, -4.775, 2.0315), which lift every singular value close to
1 quickly but leave them scattered around it (roughly 0.7-1.2), then 2 with (2, -1.5, 0.5), whose
polynomial has the fixed point 1 with zero slope and so pulls them onto 1
(``optim.muon_ns_schedule: hybrid``); the update rescaled to RMS 0.18 (``muon_update_rms``); momentum
0.95 and weight decay 0.1; AdamW kept for the embedding, the prediction head, the hyper-connections'
static biases and gating factors and the RMSNorm weights, Muon for every other matrix, which is
what :func:`muon_param_groups` does. configs/pretrain/tiny-v4.yaml uses all of them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

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


def muon_param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Three groups: Muon for hidden matrices (decayed); AdamW without decay for norms, biases and
    embeddings; AdamW with decay for the output head (``model.head``, kept out of Muon as in V4).
    The first two line up with :func:`param_groups` (decayed first, undecayed second)."""
    embedding = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    head = {id(p) for name, m in model.named_modules() if name == "head" for p in m.parameters()}
    muon, plain, head_params = [], [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        if id(p) in head and id(p) not in embedding:
            head_params.append(p)
        elif p.dim() >= 2 and id(p) not in embedding:
            muon.append(p)
        else:
            plain.append(p)
    return [
        {"params": muon, "weight_decay": weight_decay, "use_muon": True},
        {"params": plain, "weight_decay": 0.0, "use_muon": False},
        {"params": head_params, "weight_decay": weight_decay, "use_muon": False},
    ]


# Newton-Schulz coefficients (a, b, c) of x <- a x + b (x xᵀ) x + c (x xᵀ)² x
JORDAN = (3.4445, -4.775, 2.0315)  # maximal slope at 0: fast, converges only near 1 (Jordan et al.)
STABILISE = (2.0, -1.5, 0.5)  # p(1) = 1, p'(1) = 0: pins singular values near 1 onto 1
NS_SCHEDULES: dict[str, Callable[[int | None], tuple[tuple[float, float, float], ...]]] = {
    "jordan": lambda steps: (JORDAN,) * (5 if steps is None else steps),
    "hybrid": lambda steps: (JORDAN,) * 8 + (STABILISE,) * 2,  # DeepSeek-V4's hybrid schedule
}


def ns_coefficients(schedule: str, steps: int | None = None) -> tuple[tuple[float, float, float], ...]:
    """The per-iteration coefficients of the named schedule (``steps``: jordan's iteration count)."""
    return NS_SCHEDULES[schedule](steps)


def newton_schulz(
    g: torch.Tensor, steps: int | Sequence[tuple[float, float, float]], eps: float = 1e-7
) -> torch.Tensor:
    """An approximate orthogonalisation ``U S' Vᵀ`` (S' near 1) of each matrix of ``g`` [..., A, B]
    by the quintic Newton-Schulz iteration, in bfloat16 (torch's Muon does the same per matrix).
    ``steps``: an iteration count with Jordan's coefficients, or one (a, b, c) per iteration."""
    schedule = (JORDAN,) * steps if isinstance(steps, int) else tuple(steps)
    x = g.bfloat16()
    tall = g.shape[-2] > g.shape[-1]
    if tall:
        x = x.mT
    shape = x.shape
    x = x.reshape(-1, *shape[-2:])
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)  # spectral norm at most 1
    for a, b, c in schedule:  # fused multiply-adds, as torch's Muon (same bfloat16 rounding)
        gram = x @ x.mT
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    x = x.reshape(shape)
    return x.mT if tall else x


class MuonAdamW(torch.optim.Optimizer):
    """Muon on groups with ``use_muon``, AdamW on the others, in one optimizer (module docstring)."""

    def __init__(
        self,
        groups: list[dict],
        lr: float,
        betas: tuple[float, float],
        eps: float,
        momentum: float = 0.95,
        ns_steps: int = 5,
        update_rms: float = 0.2,
        ns_coefficients: Sequence[tuple[float, float, float]] | None = None,
    ) -> None:
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": 0.0,
            "momentum": momentum,
            "ns_steps": ns_steps,
            # one (a, b, c) per Newton-Schulz iteration; None: ns_steps of Jordan's
            "ns_coefficients": None if ns_coefficients is None else [list(c) for c in ns_coefficients],
            "update_rms": update_rms,
            "use_muon": False,
        }
        super().__init__(groups, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    (self._muon if group["use_muon"] else self._adamw)(p, group)
        return loss

    def _muon(self, p: torch.Tensor, group: dict) -> None:
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p)
        buf, mu = state["momentum_buffer"], group["momentum"]
        buf.lerp_(p.grad, 1 - mu)
        update = p.grad.lerp(buf, mu)  # Nesterov
        # a state saved before ns_coefficients existed restores groups without the key
        schedule = group.get("ns_coefficients") or group["ns_steps"]
        ortho = newton_schulz(update, schedule).to(p.dtype)
        A, B = p.shape[-2:]
        # torch's Muon scales by its first two dims; per matrix here (the same for 2-D parameters)
        scaled_lr = group["lr"] * group["update_rms"] * math.sqrt(max(A, B))
        p.mul_(1 - group["lr"] * group["weight_decay"])
        p.add_(ortho, alpha=-scaled_lr)

    def _adamw(self, p: torch.Tensor, group: dict) -> None:
        state = self.state[p]
        if "step" not in state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        beta1, beta2 = group["betas"]
        state["step"] += 1
        t = float(state["step"])
        p.mul_(1 - group["lr"] * group["weight_decay"])
        state["exp_avg"].lerp_(p.grad, 1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
        denom = (state["exp_avg_sq"].sqrt() / math.sqrt(1 - beta2**t)).add_(group["eps"])
        p.addcdiv_(state["exp_avg"], denom, value=-group["lr"] / (1 - beta1**t))


def make_optimizer(model: nn.Module, optim: OptimConfig) -> torch.optim.Optimizer:
    """The optimizer ``optim.optimizer`` names, over ``model``'s trainable parameters."""
    if optim.optimizer == "muon":
        return MuonAdamW(
            muon_param_groups(model, optim.weight_decay),
            lr=optim.lr,
            betas=tuple(optim.betas),
            eps=optim.eps,
            momentum=optim.muon_momentum,
            update_rms=optim.muon_update_rms,
            ns_coefficients=ns_coefficients(optim.muon_ns_schedule, optim.muon_ns_steps),
        )
    adamw = torch.optim.AdamW(
        param_groups(model, optim.weight_decay),
        lr=optim.lr,
        betas=tuple(optim.betas),
        eps=optim.eps,
        fused=optim.fused or None,  # None when off: the same groups (and checkpoints) as before the option
    )
    adamw.register_load_state_dict_post_hook(_keep_fused(optim.fused))
    return adamw


def _keep_fused(fused: bool) -> Callable[[torch.optim.Optimizer], None]:
    """Loading a state dict replaces the param groups with the saved ones, ``fused`` included: a
    run resumed with another ``optim.fused`` than its checkpoint's keeps the configured one. The
    step counts move to where that implementation keeps them (fused: the parameter's device,
    the loop: the CPU)."""

    def hook(optimizer: torch.optim.Optimizer) -> None:
        for group in optimizer.param_groups:
            group["fused"] = fused or None
            for p in group["params"]:
                state = optimizer.state.get(p, {})
                if "step" in state:
                    state["step"] = state["step"].to(device=p.device if fused else "cpu", dtype=torch.float32)

    return hook


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
    model: nn.Module, optim: OptimConfig, total_steps: int, tokens_seen: Callable[[], float] | None = None
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """The optimizer (AdamW, or Muon + AdamW) and its LR schedule: by step, or by tokens seen when
    ``optim.token_schedule`` is set (``tokens_seen`` then reports the run's count whenever the
    scheduler steps)."""
    optimizer = make_optimizer(model, optim)
    if optim.token_schedule is not None:
        if tokens_seen is None:
            raise ValueError("a token schedule needs the run's tokens_seen")
        segments = optim.token_schedule
        factor = lambda step: piecewise(tokens_seen(), 0.0, segments) / optim.lr  # noqa: E731
    else:
        factor = lambda step: lr_multiplier(step, total_steps, optim)  # noqa: E731
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
