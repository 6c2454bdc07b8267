"""MLA's absorbed (MQA) attention over each query's selected latent rows, forward and backward.

What it computes. Query row t·h (query token t, head h) attends to the K latent rows that the
indexer selected for token t (``idx_BTK``; ``keep_BTK`` false for a selected row the query may not
see), exactly ``softmax(q·rowsᵀ·scale) · rows[:, :C]`` over those K rows: the math of DSA's sparse
attention, whose cost must grow with T·K, not with T·S.

Why not a gather per query. Gathering K rows of L values for every query and running H-row
matmuls against them reads T·K·L values per pass: with few heads the matmuls are starved by the
gather, and autograd's backward of slices and gathers adds dense [B, T, ...] and [B, S, L] zero
buffers per chunk (on the CPU that made the old path 10-36x slower than dense MLA).

How. Queries go in blocks of ``QUERY_BLOCK`` tokens. A block gathers the union U of its tokens'
selected rows ONCE and scores all its t·H query rows against them in one GEMM, masking for each
token the rows it did not select: exact, because softmax over U with the others at -inf equals
softmax over the K selected. Neighbouring tokens select mostly the same rows (recent tokens,
attention sinks), so |U| stays near K; where it does not, the block is halved until
|U| <= ``UNION_FACTOR``·K or it holds too few query rows to halve again (``MIN_QUERY_ROWS``: below
that the GEMMs are too thin to run at speed on a CPU; a one-token block's U is its own K rows). So
every query row scores at most max(UNION_FACTOR, ⌈MIN_QUERY_ROWS/H⌉)·K rows: O(T·K) at worst,
never O(T·S). With many heads (V3's 128) every token can be its own block.

Memory. Forward keeps only the output and the block plan (U and each selected row's place in it,
int64 the size of ``idx_BTK``); backward regathers each block's rows and recomputes its
probabilities (flash-attention's recompute), writes the query gradient in place and scatters the
row gradient into one [B, S, L] buffer: nothing dense in T·S is ever held.

Shapes: B batch, T queries, S visible rows, H heads, L latent row width (C + R), C kv_lora_rank,
K selected rows per query, t tokens of a block, U rows of a block's union, M = t·H query rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["MIN_QUERY_ROWS", "QUERY_BLOCK", "UNION_FACTOR", "attend_selected"]

# tokens per block: t·H query rows make one GEMM against the block's gathered rows
QUERY_BLOCK = 64
# a block is split while its union holds more than UNION_FACTOR·K rows: bounds the work per query
UNION_FACTOR = 2.0
# ... and while each half keeps at least this many query rows (t·H): thinner GEMMs starve on a CPU
MIN_QUERY_ROWS = 64


@dataclass(frozen=True)
class _Block:
    """Tokens t0:t1 of batch row b, the union of their selected rows U (sorted positions in S),
    each selected row's place in U [t, K], and which rows of U each token does NOT attend to [t, U]."""

    b: int
    t0: int
    t1: int
    rows_U: torch.Tensor
    place_tK: torch.Tensor
    hidden_tU: torch.Tensor


def _union(idx_tK: torch.Tensor, S: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted distinct rows of idx [U] and each entry's place among them [t, K] (a bitmap of S,
    no sort: O(S + t·K))."""
    marked_S = torch.zeros(S, dtype=torch.bool, device=idx_tK.device)
    marked_S[idx_tK.reshape(-1)] = True
    rows_U = marked_S.nonzero().squeeze(1)
    place_S = torch.empty(S, dtype=torch.long, device=idx_tK.device)
    place_S[rows_U] = torch.arange(rows_U.numel(), device=idx_tK.device)
    return rows_U, place_S[idx_tK]


def _plan(
    b: int, t0: int, t1: int, idx_TK: torch.Tensor, keep_TK: torch.Tensor, S: int, limit: int, min_tokens: int
) -> list[_Block]:
    rows_U, place_tK = _union(idx_TK[t0:t1], S)
    if rows_U.numel() > limit and t1 - t0 >= 2 * min_tokens:
        mid = (t0 + t1) // 2
        halves = ((t0, mid), (mid, t1))
        return [blk for lo, hi in halves for blk in _plan(b, lo, hi, idx_TK, keep_TK, S, limit, min_tokens)]
    hidden_tU = torch.ones(t1 - t0, rows_U.numel(), dtype=torch.bool, device=idx_TK.device)
    hidden_tU.scatter_(1, place_tK, ~keep_TK[t0:t1])
    return [_Block(b, t0, t1, rows_U, place_tK, hidden_tU)]


def _plan_all(idx_BTK: torch.Tensor, keep_BTK: torch.Tensor, S: int, heads: int) -> list[_Block]:
    B, T, K = idx_BTK.shape
    limit, min_tokens = max(int(UNION_FACTOR * K), K), max(1, -(-MIN_QUERY_ROWS // heads))
    return [
        block
        for b in range(B)
        for t0 in range(0, T, QUERY_BLOCK)
        for block in _plan(b, t0, min(T, t0 + QUERY_BLOCK), idx_BTK[b], keep_BTK[b], S, limit, min_tokens)
    ]


def _probabilities(q_ML: torch.Tensor, rows_UL: torch.Tensor, hidden_tU: torch.Tensor, heads: int) -> torch.Tensor:
    """Each query row's distribution over the block's rows [M, U] (0 where not selected/visible);
    ``q_ML`` comes scaled by the softmax scale (M·L values to scale, not M·U)."""
    scores_tHU = (q_ML @ rows_UL.T).view(hidden_tU.shape[0], heads, -1)
    p_tHU = scores_tHU.masked_fill_(hidden_tU[:, None], float("-inf")).float().softmax(-1)
    return p_tHU.to(q_ML.dtype).view(q_ML.shape[0], -1)


def _add_rows(grad_SL: torch.Tensor, rows_U: torch.Tensor, grad_UL: torch.Tensor) -> None:
    """grad[rows] += grad_rows for distinct rows: a read-add-write that runs in parallel
    (index_add_ accumulates serially on the CPU)."""
    grad_SL[rows_U] = grad_SL.index_select(0, rows_U).add_(grad_UL)


class _SelectedAttention(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        q_BTHL: torch.Tensor,
        latent_BSL: torch.Tensor,
        idx_BTK: torch.Tensor,
        keep_BTK: torch.Tensor,
        scale: float,
        C: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        B, T, H, L = q_BTHL.shape
        blocks = _plan_all(idx_BTK, keep_BTK, latent_BSL.shape[1], H)
        o_BTHC = q_BTHL.new_empty(B, T, H, C)
        dist_BTK = torch.empty(idx_BTK.shape, dtype=torch.float32, device=q_BTHL.device)
        for blk in blocks:
            rows_UL = latent_BSL[blk.b].index_select(0, blk.rows_U)
            q_ML = q_BTHL[blk.b, blk.t0 : blk.t1].reshape(-1, L) * scale
            p_MU = _probabilities(q_ML, rows_UL, blk.hidden_tU, H)
            o_BTHC[blk.b, blk.t0 : blk.t1] = (p_MU @ rows_UL[:, :C]).view(-1, H, C)
            # the heads' mean distribution over the K selected rows: the indexer's KL target
            dist_BTK[blk.b, blk.t0 : blk.t1] = p_MU.view(-1, H, p_MU.shape[1]).float().mean(1).gather(1, blk.place_tK)
        ctx.blocks, ctx.scale = blocks, scale
        ctx.save_for_backward(q_BTHL, latent_BSL, o_BTHC)
        ctx.mark_non_differentiable(dist_BTK)
        return o_BTHC, dist_BTK

    @staticmethod
    def backward(ctx: Any, grad_o_BTHC: torch.Tensor, _grad_dist: torch.Tensor) -> tuple[Any, ...]:
        q_BTHL, latent_BSL, o_BTHC = ctx.saved_tensors
        H, L, C = q_BTHL.shape[2], q_BTHL.shape[3], o_BTHC.shape[3]
        grad_q_BTHL = torch.zeros_like(q_BTHL)
        grad_latent_BSL = torch.zeros_like(latent_BSL)
        for blk in ctx.blocks:
            b, span = blk.b, slice(blk.t0, blk.t1)
            rows_UL = latent_BSL[b].index_select(0, blk.rows_U)
            q_ML = q_BTHL[b, span].reshape(-1, L) * ctx.scale
            p_MU = _probabilities(q_ML, rows_UL, blk.hidden_tU, H)
            grad_o_MC = grad_o_BTHC[b, span].reshape(-1, C)
            # softmax backward: dS = P ∘ (dP − rowsum(dO ∘ O)), dP = dO · rows_Cᵀ (scores = scaled q · rows)
            delta_M1 = (grad_o_MC * o_BTHC[b, span].reshape(-1, C)).sum(-1, keepdim=True)
            grad_s_MU = (grad_o_MC @ rows_UL[:, :C].T).sub_(delta_M1).mul_(p_MU)
            grad_q_BTHL[b, span] = (grad_s_MU @ rows_UL).mul_(ctx.scale).view(-1, H, L)
            grad_rows_UL = grad_s_MU.T @ q_ML
            grad_rows_UL[:, :C] += p_MU.T @ grad_o_MC
            _add_rows(grad_latent_BSL[b], blk.rows_U, grad_rows_UL)
        return grad_q_BTHL, grad_latent_BSL, None, None, None, None


def attend_selected(
    q_BTHL: torch.Tensor, latent_BSL: torch.Tensor, idx_BTK: torch.Tensor, keep_BTK: torch.Tensor, scale: float, C: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Latent output [B,T,H,C] of each query row over its token's selected rows, and the heads'
    mean attention distribution over those rows [B,T,K] in fp32 (no gradient)."""
    return _SelectedAttention.apply(q_BTHL, latent_BSL, idx_BTK, keep_BTK, scale, C)
