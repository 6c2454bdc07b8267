"""Expert parallelism (EP): each rank of an ``ep_group`` holds E/ep of the routed experts.

The routing decision stays local (every rank routes its own tokens over all E experts); only
the expert computation is distributed. One MoE forward under EP (GShard / DeepSpeed-MoE /
Megatron's "alltoall" token dispatcher, dropless):

1. *permute*: sort the T·K (token, expert) pairs by expert id. Experts are laid out
   contiguously by rank (rank r owns experts [r·E_local, (r+1)·E_local)), so the sorted rows
   are also grouped by destination rank;
2. *counts first*: an all-to-all of the per-expert counts tells every rank how many rows it
   will receive from each peer for each of its local experts, so the token all-to-all can use
   exact, variable split sizes (no capacity, no padding, no dropped token);
3. *dispatch*: all-to-all of the rows; a rank receives them ordered (source rank, local expert)
   and regroups them by local expert for one grouped GEMM per projection;
4. *combine*: the reverse all-to-all brings each row back to the rank and the slot it came
   from; the gate weights scale it and a scatter-add sums the K experts of each token.

Under ``compile: block`` the whole layer, dispatch included, is one graph of its block. The split
sizes are read once per forward (one ``.tolist()`` of 2·ep integers, the only host read on the
grouped-GEMM path; the backward reuses them; widths the grouped GEMM cannot take read the group
sizes for a per-expert loop too), and a compiled block traces that read as symbolic integers (the core's
``Block.compile`` scopes torch's ``capture_scalar_outputs`` to the block's calls): the
all-to-alls, whose output sizes are sums of those integers, and every shape after them are
symbolic, so the exchange stays exact and dropless and nothing is padded. torch traces
``dist.all_to_all_single`` (through its functional collective) and the ``AllToAll`` autograd
Function, backward included; the regroup by local expert gives ``repeat_interleave`` its
``output_size`` (the received rows) so that its size is known to the trace. Compiled results equal
eager ones within float rounding (inductor fuses the elementwise parts); eager results are those
of the exact exchange as before. A fixed-capacity exchange (every peer sends T·K rows, padded)
would need no host read at all, at ep× the traffic; it is not needed to compile.

Both all-to-alls are autograd-aware (``AllToAll``, around ``torch.distributed.all_to_all_single``):
the backward of a dispatch is a combine of the gradients and vice versa, so gradients of the
local experts include every rank's tokens. Only the stacked expert weights are sharded; the
parameter names (``w1``/``w2``/``w3``) and layouts are those of ``GroupedExperts``, so a
checkpoint gathered over the EP group is an ordinary moeframe checkpoint.

Shapes: T tokens on this rank, K experts per token, N = T·K routed rows, E experts in all,
El = E/ep local experts, R rows received, D model width, F expert hidden width.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from moeframe.plugin import (
    ExpertsBase,
    ForwardContext,
    GroupedGemm,
    count_per_expert,
    grouped_mm,
    grouped_mm_supported,
    moe_layers,
)


def all_to_all(
    x_ND: torch.Tensor, recv_splits: list[int] | None, send_splits: list[int] | None, group: dist.ProcessGroup | None
) -> torch.Tensor:
    """Rows ``send_splits[r]`` of ``x_ND`` go to rank r; returns the rows received, ``recv_splits[r]``
    from rank r, in rank order (even splits when both are None)."""
    rows = sum(recv_splits) if recv_splits is not None else x_ND.shape[0]
    out_RD = x_ND.new_empty((rows, *x_ND.shape[1:]))
    dist.all_to_all_single(out_RD, x_ND.contiguous(), recv_splits, send_splits, group=group)
    return out_RD


class AllToAll(torch.autograd.Function):
    """``all_to_all`` whose backward sends the gradients back the way the rows came."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        x_ND: torch.Tensor,
        recv_splits: list[int],
        send_splits: list[int],
        group: dist.ProcessGroup | None,
    ) -> torch.Tensor:
        ctx.splits, ctx.group = (recv_splits, send_splits), group  # type: ignore[attr-defined]
        return all_to_all(x_ND, recv_splits, send_splits, group)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_RD: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        recv_splits, send_splits = ctx.splits  # type: ignore[attr-defined]
        return all_to_all(grad_RD, send_splits, recv_splits, ctx.group), None, None, None  # type: ignore[attr-defined]


__all__ = ["EPExperts", "expert_ffn"]


def _linear_per_expert(x_RD: torch.Tensor, w_EOD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    """``x @ w_eᵀ`` for contiguous row slices, one grouped GEMM when the kernel supports it
    (``grouped_mm``: the same kernel, traceable in float32 under ``torch.compile`` too)."""
    if grouped_mm_supported(x_RD, w_EOD):
        return grouped_mm(x_RD, w_EOD.transpose(-2, -1), counts_E.cumsum(0).to(torch.int32))
    chunks = torch.split(x_RD, counts_E.tolist())
    return torch.cat([c @ w.T for c, w in zip(chunks, w_EOD)], dim=0)


def expert_ffn(
    x_RD: torch.Tensor,
    w1_EFD: torch.Tensor,
    w2_EDF: torch.Tensor,
    w3_EFD: torch.Tensor,
    counts_E: torch.Tensor,
    grouped_gemm: GroupedGemm | None = None,
) -> torch.Tensor:
    """SwiGLU experts over rows already grouped by expert (``counts_E`` rows each); a precision
    plugin's ``grouped_gemm`` (the experts seam of ``moeframe.plugin``) runs the projections when given."""
    if grouped_gemm is not None:
        offs_E = counts_E.cumsum(0).to(torch.int32)

        def project(name: str, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            return grouped_gemm(name, x, w, offs_E)
    else:

        def project(name: str, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            return _linear_per_expert(x, w, counts_E)

    h_RF = F.silu(project("w1", x_RD, w1_EFD)) * project("w3", x_RD, w3_EFD)
    return project("w2", h_RF, w2_EDF)


class EPExperts(ExpertsBase):
    """The local shard of a layer's routed experts, with token dispatch over ``ep_group``.

    Built from a full (unsharded) experts module by ``from_full``, which keeps this rank's
    slice of the stacked weights; the forward has the experts-plugin signature, and the
    grouped-GEMM seam is declared as on the core's grouped experts (fp8 runs here too).
    """

    grouped_gemm_seam = True
    plugin_api = "2"  # called with the forward context (unused: dispatch depends on the routing alone)

    def __init__(self, num_experts: int, dim: int, hidden_dim: int, ep_group: dist.ProcessGroup) -> None:
        nn.Module.__init__(self)  # built from a full experts module (from_full), not from a model config
        self.ep_group = ep_group
        self.ep_size = dist.get_world_size(ep_group)
        self.ep_rank = dist.get_rank(ep_group)
        assert num_experts % self.ep_size == 0, "validated by the strategy before the process group exists"
        self.num_experts = num_experts
        self.num_local_experts = num_experts // self.ep_size
        self.grouped_gemm: GroupedGemm | None = None  # a precision plugin's (fp8), as on GroupedExperts
        self.w1 = nn.Parameter(torch.empty(self.num_local_experts, hidden_dim, dim))
        self.w2 = nn.Parameter(torch.empty(self.num_local_experts, dim, hidden_dim))
        self.w3 = nn.Parameter(torch.empty(self.num_local_experts, hidden_dim, dim))

    @classmethod
    def from_full(cls, full: nn.Module, ep_group: dist.ProcessGroup) -> EPExperts:
        num_experts, hidden_dim, dim = full.w1.shape
        with torch.device(full.w1.device):  # a meta-device model (a pipeline rank's start) allocates nothing
            shard = cls(num_experts, dim, hidden_dim, ep_group).to(dtype=full.w1.dtype)
        with torch.no_grad():
            for name in ("w1", "w2", "w3"):
                getattr(shard, name).copy_(shard.local_slice(getattr(full, name)))
        if isinstance(full, ExpertsBase) and full.has_grouped_gemm_seam():
            shard.set_grouped_gemm(full.grouped_gemm)  # fp8 converted before the swap stays fp8
        return shard

    def local_slice(self, full_E: torch.Tensor) -> torch.Tensor:
        """This rank's experts of a tensor stacked over all E experts (dim 0)."""
        start = self.ep_rank * self.num_local_experts
        return full_E[start : start + self.num_local_experts]

    def forward(
        self, x_TD: torch.Tensor, weights_TK: torch.Tensor, indices_TK: torch.Tensor, ctx: ForwardContext | None = None
    ) -> torch.Tensor:
        T, K = indices_TK.shape
        # 1. permute: rows sorted by expert are also grouped by destination rank
        order_N = indices_TK.flatten().argsort(stable=True)
        token_N = order_N // K
        counts_E = count_per_expert(indices_TK, self.num_experts)  # static size, unlike bincount
        x_ND = x_TD[token_N]
        # 2. counts first: recv_counts[r, e] = rows peer r sends to my local expert e
        recv_counts_RE = self._exchange_counts(counts_E)
        send_splits, recv_splits = self._splits(counts_E, recv_counts_RE)
        # 3. dispatch, then regroup the (source rank, local expert)-ordered rows by local expert
        x_RD = AllToAll.apply(x_ND, recv_splits, send_splits, self.ep_group)
        local_expert_R = torch.repeat_interleave(
            torch.arange(self.num_local_experts, device=x_RD.device).repeat(self.ep_size),
            recv_counts_RE.flatten(),
            output_size=x_RD.shape[0],  # a size the trace knows: repeat_interleave's own is data-dependent
        )
        by_expert_R = local_expert_R.argsort(stable=True)
        y_RD = torch.empty_like(x_RD)
        y_RD[by_expert_R] = expert_ffn(
            x_RD[by_expert_R], self.w1, self.w2, self.w3, recv_counts_RE.sum(0), self.grouped_gemm
        )
        # 4. combine: the reverse all-to-all restores this rank's sorted row order
        y_ND = AllToAll.apply(y_RD, send_splits, recv_splits, self.ep_group)
        y_ND = y_ND * weights_TK.flatten()[order_N].unsqueeze(-1).to(y_ND.dtype)
        return torch.zeros_like(x_TD).index_add_(0, token_N, y_ND)

    def _splits(self, counts_E: torch.Tensor, recv_counts_RE: torch.Tensor) -> tuple[list[int], list[int]]:
        """Rows this rank sends to / receives from each peer, read to the host in one go (the
        all-to-all takes host sizes; under ``compile: block`` they are symbolic integers)."""
        send_R = counts_E.view(self.ep_size, self.num_local_experts).sum(1)
        sizes = torch.cat([send_R, recv_counts_RE.sum(1)]).tolist()
        return sizes[: self.ep_size], sizes[self.ep_size :]

    def _exchange_counts(self, counts_E: torch.Tensor) -> torch.Tensor:
        """[ep, El]: for each peer, how many rows it sends to each of my local experts."""
        recv_E = all_to_all(counts_E, None, None, self.ep_group)
        return recv_E.view(self.ep_size, self.num_local_experts)

    def extra_repr(self) -> str:
        return (
            f"experts {self.ep_rank * self.num_local_experts}..{(self.ep_rank + 1) * self.num_local_experts - 1} "
            f"of {self.num_experts} (ep_size={self.ep_size})"
        )


def replace_experts(model: nn.Module, ep_group: dist.ProcessGroup) -> list[str]:
    """Swap every MoE layer's experts for its EP shard; return the qualified names swapped."""
    swapped = []
    for name, moe in moe_layers(model):
        if not isinstance(moe.experts, EPExperts):
            moe.experts = EPExperts.from_full(moe.experts, ep_group)
        swapped.append(f"{name}.experts" if name else "experts")
    return swapped


def ep_modules(model: nn.Module) -> list[tuple[str, EPExperts]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, EPExperts)]
