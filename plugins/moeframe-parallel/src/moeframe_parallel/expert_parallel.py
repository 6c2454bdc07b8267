"""``ep`` / ``ep2_ddp``: expert parallelism composed with data parallelism, a DDP strategy.

World of W ranks, EP degree ``ep_size``: consecutive ranks form an ``ep_group`` (they shard the
routed experts among them and exchange tokens, see ``ep_experts``); ranks holding the same
expert shard form an ``edp_group`` ("expert data parallel", Megatron's name) of W/ep_size ranks.
Every rank still sees its own micro-batch, so non-expert weights are plain data parallel.

Gradients need two different reductions:
- non-expert weights: DDP's usual mean over all W ranks;
- expert weights: the dispatch already brought every ep peer's tokens to the local experts,
  so their gradient holds the ep group's contributions; it is summed over the ``edp_group``
  (the other replicas of this shard) and divided by W, which is exactly DDP's mean.
DDP is told to ignore the expert parameters (it would average shards of *different* experts)
and the strategy reduces them itself once per optimizer step, after the last micro-batch.

Gradient clipping by norm needs the norm of the whole model: expert shards differ between
ep peers, so their squared norms are summed over the ep group. A local norm would give each
rank a different clip factor and silently desynchronise the replicated weights.

Checkpoints are layout-free: expert weights and their optimizer state are gathered over the
ep group on save (``[E, ...]``, the ``GroupedExperts`` layout) and sliced again on load, so a
run can resume with another EP degree or without EP, and ``moeframe convert`` reads it.
The router's bias update is unaffected: routing and counting happen before dispatch, and
``ExpertBalance`` sums the counts over all ranks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from datetime import timedelta
from types import MethodType
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy
from torch import nn

from moeframe.plugin import check_ep_layout, ddp_ignore
from moeframe_parallel.ep_experts import EPExperts, ep_modules, replace_experts
from moeframe_parallel.layouts import EP2DDPLayout, EPLayout

__all__ = ["ExpertParallelStrategy", "EP2DDPStrategy", "check_ep_size", "new_ep_groups"]


def check_ep_size(ep_size: int, world_size: int, num_experts: int | None) -> None:
    """The layout check ``moeframe inspect`` runs too (one rule, one message): a ConfigError
    naming the fix when the EP degree cannot lay the experts out on the ranks."""
    check_ep_layout(ep_size, world_size, num_experts)


def new_ep_groups(ep_size: int) -> tuple[dist.ProcessGroup, dist.ProcessGroup]:
    """(ep_group, edp_group) of this rank. Every rank creates every group, as new_group requires."""
    world, rank = dist.get_world_size(), dist.get_rank()
    ep_group = edp_group = None
    for start in range(0, world, ep_size):  # consecutive ranks: on one node, the fast links
        group = dist.new_group(list(range(start, start + ep_size)))
        if start <= rank < start + ep_size:
            ep_group = group
    for offset in range(ep_size):
        group = dist.new_group(list(range(offset, world, ep_size)))
        if rank % ep_size == offset:
            edp_group = group
    assert ep_group is not None and edp_group is not None
    return ep_group, edp_group


class ExpertParallelStrategy(DDPStrategy, EPLayout):
    """DDP with the routed experts sharded over ``ep_size`` ranks (``ep_size=1``: plain DDP)."""

    strategy_name = "ep"

    def __init__(self, ep_size: int = 2, **kwargs: Any) -> None:
        check_ep_size(ep_size, ep_size, None)
        kwargs.setdefault("timeout", timedelta(minutes=30))
        super().__init__(**kwargs)
        self.ep_size = ep_size
        self.ep_group: dist.ProcessGroup | None = None
        self.edp_group: dist.ProcessGroup | None = None

    # -- before any process group: validate ------------------------------------------------------
    def setup_environment(self) -> None:
        world = self.num_nodes * self.num_processes
        config = getattr(self.lightning_module, "config", None)
        check_ep_size(self.ep_size, world, getattr(config, "n_routed_experts", None))
        super().setup_environment()

    # -- after configure_model, before DDP wraps the model -----------------------------------------
    def setup(self, trainer: Any) -> None:
        self.ep_group, self.edp_group = new_ep_groups(self.ep_size)
        names = replace_experts(self.lightning_module, self.ep_group)
        if not names:
            raise ValueError("strategy 'ep': the model has no MoE layer to shard")
        ignored = [n for n, _ in self.lightning_module.named_parameters() if _is_expert_param(n, names)]
        ddp_ignore(self.lightning_module, ignored)  # added to those already ignored (the expert counts)
        super().setup(trainer)
        self.precision_plugin.clip_grad_by_norm = MethodType(_ep_clip_grad_by_norm(self), self.precision_plugin)

    def expert_parameters(self) -> list[nn.Parameter]:
        return [p for _, m in ep_modules(self.lightning_module) for p in m.parameters()]

    # -- once per optimizer step: the expert gradients ----------------------------------------------
    def optimizer_step(self, optimizer: Any, closure: Callable[[], Any], model: Any = None, **kwargs: Any) -> Any:
        def closure_then_reduce() -> Any:
            result = closure()  # the last micro-batch's forward/backward; .grad is now complete
            self.reduce_expert_grads()
            return result

        return super().optimizer_step(optimizer, closure_then_reduce, model, **kwargs)

    @torch.no_grad()
    def reduce_expert_grads(self) -> None:
        grads = [p.grad for p in self.expert_parameters() if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.flatten() for g in grads])  # one collective for all layers
        if dist.get_world_size(self.edp_group) > 1:
            dist.all_reduce(flat, group=self.edp_group)
        flat.div_(self.world_size)
        for g, new in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(new.view_as(g))

    # -- checkpoints: full [E, ...] experts, whatever the EP degree --------------------------------
    def lightning_module_state_dict(self) -> dict[str, Any]:
        state = super().lightning_module_state_dict()
        for name, module in ep_modules(self.lightning_module):
            for w in ("w1", "w2", "w3"):
                state[f"{name}.{w}"] = _gather_experts(getattr(module, w).detach(), module.ep_group)
        return state

    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        state = dict(checkpoint["state_dict"])
        for name, module in ep_modules(self.lightning_module):
            for w in ("w1", "w2", "w3"):
                key = f"{name}.{w}"
                if key in state and state[key].shape[0] == module.num_experts:
                    state[key] = module.local_slice(state[key])
        self.lightning_module.load_state_dict(state, strict=strict)

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        state = optimizer.state_dict()
        for index, module in self._expert_state_indices(optimizer):
            for key, value in state["state"].get(index, {}).items():
                if _is_expert_shaped(value, module.num_local_experts):
                    state["state"][index][key] = _gather_experts(value, module.ep_group)
        return state

    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        for optimizer, opt_state in zip(self.optimizers, checkpoint["optimizer_states"]):
            for index, module in self._expert_state_indices(optimizer):
                for key, value in opt_state["state"].get(index, {}).items():
                    if _is_expert_shaped(value, module.num_experts):
                        opt_state["state"][index][key] = module.local_slice(value).clone()
            optimizer.load_state_dict(opt_state)

    def _expert_state_indices(self, optimizer: torch.optim.Optimizer) -> list[tuple[int, EPExperts]]:
        """Optimizer-state indices (torch numbers parameters across groups) of the expert weights."""
        owner = {id(p): m for _, m in ep_modules(self.lightning_module) for p in m.parameters()}
        params = [p for group in optimizer.param_groups for p in group["params"]]
        return [(i, owner[id(p)]) for i, p in enumerate(params) if id(p) in owner]


class EP2DDPStrategy(ExpertParallelStrategy, EP2DDPLayout):
    """``ep2_ddp``: experts sharded over pairs of ranks, data parallel across the pairs."""

    strategy_name = "ep2_ddp"

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("ep_size", 2)
        super().__init__(**kwargs)


def _is_expert_param(name: str, expert_modules: list[str]) -> bool:
    return any(name.startswith(prefix + ".") for prefix in expert_modules)


def _is_expert_shaped(value: Any, leading: int) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == leading


def _gather_experts(shard_E: torch.Tensor, ep_group: dist.ProcessGroup) -> torch.Tensor:
    """Concatenate the ep peers' shards along the expert dimension (a collective: every rank calls it)."""
    parts = [torch.empty_like(shard_E) for _ in range(dist.get_world_size(ep_group))]
    dist.all_gather(parts, shard_E.contiguous(), group=ep_group)
    return torch.cat(parts, dim=0)


def _ep_clip_grad_by_norm(strategy: ExpertParallelStrategy) -> Callable[..., None]:
    def clip_grad_by_norm(precision: Any, optimizer: torch.optim.Optimizer, clip_val: float) -> None:
        expert_ids = {id(p) for p in strategy.expert_parameters()}
        params = [p for p in precision.main_params(optimizer) if p.grad is not None]
        dense_sq = sum((p.grad.float().pow(2).sum() for p in params if id(p) not in expert_ids), torch.zeros(()))
        expert_sq = sum((p.grad.float().pow(2).sum() for p in params if id(p) in expert_ids), torch.zeros(()))
        expert_sq = expert_sq.to(strategy.root_device)
        dist.all_reduce(expert_sq, group=strategy.ep_group)  # each expert counted once per ep group
        total_norm = math.sqrt(float(dense_sq) + float(expert_sq))
        coef = min(1.0, float(clip_val) / (total_norm + 1e-6))
        if coef < 1.0:
            for p in params:
                p.grad.mul_(coef)

    return clip_grad_by_norm
