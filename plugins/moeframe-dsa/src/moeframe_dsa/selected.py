"""MLA attention over each query's selected tokens, forward and backward, in two forms.

What it computes. Query token t attends, in every head, to the K tokens that the indexer selected
for it (``idx_BTK``; ``keep_BTK`` false for a selected token the query may not see): exactly
``softmax(q·kᵀ·scale)·v`` over those K tokens, the math of DSA's sparse attention, whose cost must
grow with T·K, not with T·S.

Two forms of the same attention, and what each costs per (query token, key):

- **expanded** (per-head keys [E = d + R] and values [v], as dense MLA trains): H·(E + v)
  multiply-adds, but a key read from memory serves one query row per head, so keys must be
  shared by many queries to feed a GEMM. Used for **blocks** of neighbouring tokens: a block
  gathers the union U of its tokens' selections once and runs one GEMM per head against it,
  masking for each token the rows it did not select (exact: softmax over U with the others at
  -inf is softmax over its K). Neighbouring tokens of a trained indexer select mostly the same
  tokens (recent ones, sinks), so U stays near K.
- **absorbed** (MQA over the shared latent row, L = C + R wide, values its first C): H·(L + C)
  multiply-adds, 3.4x the expanded form at V3's widths, but one gathered row serves all H
  heads. Used **per token**: its own K rows, no union.

The plan. Tokens go in blocks of ``QUERY_BLOCK``; a block whose union holds more rows than the
per-token form would cost (U > ``UNION_SLACK``·K·(L + C)/(E + v)) is halved, down to
``MIN_BLOCK`` tokens; what is still over goes per token. So each token costs at most
``UNION_SLACK`` times the absorbed form's K·H·(L + C): O(T·K), never O(T·S). Blocks need every
token's per-head keys and values (S·C·H·(d + v) to expand, as dense MLA does); where the blocks
would not save that much (decoding a few tokens), everything goes per token. An untrained
indexer selects nearly independent sets: U is about the causal range, dense work in blocks up to
the limit, per token beyond; a trained one's blocks stay near K + t.

Memory. Forward keeps only the outputs and the plan (each block's U and each selected row's place
in it); backward regathers and recomputes the probabilities (flash-attention's recompute), writes
the query gradients in place and adds the key/value/row gradients into one buffer each: nothing
dense in T·S is ever held.

Shapes: B batch, T queries, S visible tokens, H heads, E = d + R expanded key width, V value
width, L latent row width (C + R), C kv_lora_rank, K selected tokens per query, t tokens of a
block, U rows of a block's union, n tokens of a per-token chunk.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "MIN_BLOCK",
    "QUERY_BLOCK",
    "TOKEN_CHUNK",
    "UNION_SLACK",
    "Plan",
    "attend_blocks",
    "attend_tokens",
    "plan",
    "union",
]

# tokens per block: one GEMM per head of t query rows against the block's gathered rows
QUERY_BLOCK = 64
# halving stops here: below, each head's GEMM is too thin to beat the per-token form on a CPU
MIN_BLOCK = 16
# a block runs expanded while U <= UNION_SLACK·K·(L + C)/(E + v). At 1.0 it does no more
# multiply-adds than per token; but the per-token form reads K·L gathered values per token for
# H·K·(L + C) multiply-adds, so with few heads it is bound by memory: measured on a CPU (8 heads,
# K = 2048, fwd + bwd) 2.9 us per (token, key) against 0.21 us in blocks, about 4x slower per
# multiply-add. So blocks are kept up to 4x the per-token multiply-adds
UNION_SLACK = 4.0
# tokens whose K latent rows are gathered at once by the per-token form (n·K·L values)
TOKEN_CHUNK = 8


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


@dataclass(frozen=True)
class Plan:
    """Which tokens run in blocks (expanded form) and which per token (absorbed form, flat
    indices b·T + t)."""

    blocks: list[_Block]
    tokens_N: torch.Tensor


def union(idx_tK: torch.Tensor, S: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted distinct rows of idx [U] and each entry's place among them (idx's shape; a bitmap of
    S, no sort: O(S + t·K))."""
    marked_S = torch.zeros(S, dtype=torch.bool, device=idx_tK.device)
    marked_S[idx_tK.reshape(-1)] = True
    rows_U = marked_S.nonzero().squeeze(1)
    place_S = torch.empty(S, dtype=torch.long, device=idx_tK.device)
    place_S[rows_U] = torch.arange(rows_U.numel(), device=idx_tK.device)
    return rows_U, place_S[idx_tK]


def _plan_span(
    b: int, t0: int, t1: int, idx_TK: torch.Tensor, keep_TK: torch.Tensor, S: int, limit: int
) -> tuple[list[_Block], list[range]]:
    rows_U, place_tK = union(idx_TK[t0:t1], S)
    if rows_U.numel() > limit:
        if t1 - t0 < 2 * MIN_BLOCK:
            return [], [range(t0, t1)]
        mid = (t0 + t1) // 2
        (blocks_a, tokens_a), (blocks_b, tokens_b) = (
            _plan_span(b, t0, mid, idx_TK, keep_TK, S, limit),
            _plan_span(b, mid, t1, idx_TK, keep_TK, S, limit),
        )
        return blocks_a + blocks_b, tokens_a + tokens_b
    hidden_tU = torch.ones(t1 - t0, rows_U.numel(), dtype=torch.bool, device=idx_TK.device)
    hidden_tU.scatter_(1, place_tK, ~keep_TK[t0:t1])
    return [_Block(b, t0, t1, rows_U, place_tK, hidden_tU)], []


def plan(idx_BTK: torch.Tensor, keep_BTK: torch.Tensor, S: int, absorbed: int, expanded: int, expansion: int) -> Plan:
    """Blocks and per-token queries for a selection. ``absorbed``/``expanded``: multiply-adds per
    (token, key, head) of each form, L + C and E + v; ``expansion``: multiply-adds per head to
    expand every token's keys and values, S·C·(d + v), which blocks need and per-token queries do
    not (decoding: one token never repays it)."""
    B, T, K = idx_BTK.shape
    limit = max(K, int(UNION_SLACK * K * absorbed / expanded))
    blocks: list[_Block] = []
    tokens: list[int] = []
    for b in range(B):
        for t0 in range(0, T, QUERY_BLOCK):
            span_blocks, spans = _plan_span(b, t0, min(T, t0 + QUERY_BLOCK), idx_BTK[b], keep_BTK[b], S, limit)
            blocks += span_blocks
            tokens += [b * T + t for span in spans for t in span]
    # in the expanded form's units, a token costs UNION_SLACK·K·absorbed per token (see UNION_SLACK)
    saved = sum((blk.t1 - blk.t0) * (UNION_SLACK * K * absorbed - blk.rows_U.numel() * expanded) for blk in blocks)
    if saved <= expansion:
        blocks, tokens = [], list(range(B * T))
    return Plan(blocks, torch.tensor(tokens, dtype=torch.long, device=idx_BTK.device))


def _add_rows(grad_HSX: torch.Tensor, rows_U: torch.Tensor, grad_HUX: torch.Tensor) -> None:
    """grad[:, rows] += grad_rows for distinct rows: a read-add-write that runs in parallel
    (index_add_ accumulates serially on the CPU)."""
    grad_HSX[:, rows_U] = grad_HSX.index_select(1, rows_U).add_(grad_HUX)


def _block_probabilities(q_HtE: torch.Tensor, k_HUE: torch.Tensor, hidden_tU: torch.Tensor) -> torch.Tensor:
    """Each head's distribution of each token over the block's rows [H, t, U] (0 where not
    selected/visible); ``q_HtE`` comes scaled by the softmax scale."""
    scores_HtU = torch.bmm(q_HtE, k_HUE.transpose(1, 2)).masked_fill_(hidden_tU, float("-inf"))
    return scores_HtU.float().softmax(-1).to(q_HtE.dtype)


class _Blocks(torch.autograd.Function):
    """The expanded form over union blocks: q [B,T,H,E], k [B,H,S,E], v [B,H,S,V] → o [B,T,H,V]
    (0 for tokens outside the blocks), and the heads' mean distribution written into ``dist_BTK``."""

    @staticmethod
    def forward(
        ctx: Any,
        q_BTHE: torch.Tensor,
        k_BHSE: torch.Tensor,
        v_BHSV: torch.Tensor,
        blocks: list[_Block],
        scale: float,
        dist_BTK: torch.Tensor,
    ) -> torch.Tensor:
        o_BTHV = q_BTHE.new_zeros(*q_BTHE.shape[:3], v_BHSV.shape[-1])
        for blk in blocks:
            q_HtE = q_BTHE[blk.b, blk.t0 : blk.t1].transpose(0, 1) * scale
            k_HUE, v_HUV = k_BHSE[blk.b].index_select(1, blk.rows_U), v_BHSV[blk.b].index_select(1, blk.rows_U)
            p_HtU = _block_probabilities(q_HtE, k_HUE, blk.hidden_tU)
            o_BTHV[blk.b, blk.t0 : blk.t1] = torch.bmm(p_HtU, v_HUV).transpose(0, 1)
            # the heads' mean distribution over the K selected tokens: the indexer's KL target
            dist_BTK[blk.b, blk.t0 : blk.t1] = p_HtU.float().mean(0).gather(1, blk.place_tK)
        ctx.blocks, ctx.scale = blocks, scale
        ctx.save_for_backward(q_BTHE, k_BHSE, v_BHSV, o_BTHV)
        return o_BTHV

    @staticmethod
    def backward(ctx: Any, grad_o_BTHV: torch.Tensor) -> tuple[Any, ...]:
        q_BTHE, k_BHSE, v_BHSV, o_BTHV = ctx.saved_tensors
        grad_q_BTHE, grad_k_BHSE, grad_v_BHSV = (torch.zeros_like(t) for t in (q_BTHE, k_BHSE, v_BHSV))
        for blk in ctx.blocks:
            b, span = blk.b, slice(blk.t0, blk.t1)
            q_HtE = q_BTHE[b, span].transpose(0, 1) * ctx.scale
            k_HUE, v_HUV = k_BHSE[b].index_select(1, blk.rows_U), v_BHSV[b].index_select(1, blk.rows_U)
            p_HtU = _block_probabilities(q_HtE, k_HUE, blk.hidden_tU)
            grad_o_HtV = grad_o_BTHV[b, span].transpose(0, 1)
            # softmax backward: dS = P ∘ (dP − rowsum(dO ∘ O)), dP = dO · vᵀ
            delta_Ht1 = (grad_o_HtV * o_BTHV[b, span].transpose(0, 1)).sum(-1, keepdim=True)
            grad_s_HtU = torch.bmm(grad_o_HtV, v_HUV.transpose(1, 2)).sub_(delta_Ht1).mul_(p_HtU)
            grad_q_BTHE[b, span] = torch.bmm(grad_s_HtU, k_HUE).mul_(ctx.scale).transpose(0, 1)
            _add_rows(grad_k_BHSE[b], blk.rows_U, torch.bmm(grad_s_HtU.transpose(1, 2), q_HtE))
            _add_rows(grad_v_BHSV[b], blk.rows_U, torch.bmm(p_HtU.transpose(1, 2), grad_o_HtV))
        return grad_q_BTHE, grad_k_BHSE, grad_v_BHSV, None, None, None


def _token_probabilities(q_nHL: torch.Tensor, rows_nKL: torch.Tensor, keep_nK: torch.Tensor) -> torch.Tensor:
    """Each head's distribution of each token over its K rows [n, H, K] (0 where not visible);
    ``q_nHL`` comes scaled by the softmax scale."""
    scores_nHK = torch.bmm(q_nHL, rows_nKL.transpose(1, 2)).masked_fill_(~keep_nK[:, None], float("-inf"))
    return scores_nHK.float().softmax(-1).to(q_nHL.dtype)


class _Tokens(torch.autograd.Function):
    """The absorbed form per token: q [B,T,H,L] against latent rows [B,S,L] → o [B,T,H,C] (0 for
    tokens not in ``tokens_N``), and the heads' mean distribution written into ``dist_BTK``."""

    @staticmethod
    def forward(
        ctx: Any,
        q_BTHL: torch.Tensor,
        latent_BSL: torch.Tensor,
        idx_BTK: torch.Tensor,
        keep_BTK: torch.Tensor,
        tokens_N: torch.Tensor,
        scale: float,
        C: int,
        dist_BTK: torch.Tensor,
    ) -> torch.Tensor:
        (B, T, H, _), S, K = q_BTHL.shape, latent_BSL.shape[1], idx_BTK.shape[-1]
        # rows of the flattened [B·S, L] latent that each token selected
        rows_NK = (idx_BTK + S * torch.arange(B, device=idx_BTK.device)[:, None, None]).view(B * T, K)
        o_NHC = q_BTHL.new_zeros(B * T, H, C)
        for chunk_n in tokens_N.split(TOKEN_CHUNK):
            q_nHL, rows_nKL, keep_nK = _token_inputs(q_BTHL, latent_BSL, rows_NK, keep_BTK, chunk_n, scale)
            p_nHK = _token_probabilities(q_nHL, rows_nKL, keep_nK)
            o_NHC[chunk_n] = torch.bmm(p_nHK, rows_nKL[..., :C])
            dist_BTK.view(B * T, K)[chunk_n] = p_nHK.float().mean(1)
        ctx.scale, ctx.C = scale, C
        ctx.save_for_backward(q_BTHL, latent_BSL, rows_NK, keep_BTK, tokens_N, o_NHC)
        return o_NHC.view(B, T, H, C)

    @staticmethod
    def backward(ctx: Any, grad_o_BTHC: torch.Tensor) -> tuple[Any, ...]:
        q_BTHL, latent_BSL, rows_NK, keep_BTK, tokens_N, o_NHC = ctx.saved_tensors
        (B, T, H, L), C = q_BTHL.shape, ctx.C
        grad_o_NHC = grad_o_BTHC.reshape(B * T, H, C)
        grad_q_NHL = torch.zeros_like(q_BTHL).view(B * T, H, L)
        grad_latent_XL = torch.zeros_like(latent_BSL).view(-1, L)  # X = B·S
        for chunk_n in tokens_N.split(TOKEN_CHUNK):
            q_nHL, rows_nKL, keep_nK = _token_inputs(q_BTHL, latent_BSL, rows_NK, keep_BTK, chunk_n, ctx.scale)
            p_nHK = _token_probabilities(q_nHL, rows_nKL, keep_nK)
            grad_o_nHC = grad_o_NHC[chunk_n]
            delta_nH1 = (grad_o_nHC * o_NHC[chunk_n]).sum(-1, keepdim=True)
            grad_s_nHK = torch.bmm(grad_o_nHC, rows_nKL[..., :C].transpose(1, 2)).sub_(delta_nH1).mul_(p_nHK)
            grad_q_NHL[chunk_n] = torch.bmm(grad_s_nHK, rows_nKL).mul_(ctx.scale)
            grad_rows_nKL = torch.bmm(grad_s_nHK.transpose(1, 2), q_nHL)
            grad_rows_nKL[..., :C] += torch.bmm(p_nHK.transpose(1, 2), grad_o_nHC)
            # tokens of a chunk may share rows: accumulate
            grad_latent_XL.index_add_(0, rows_NK[chunk_n].reshape(-1), grad_rows_nKL.reshape(-1, L))
        return grad_q_NHL.view(B, T, H, L), grad_latent_XL.view_as(latent_BSL), None, None, None, None, None, None


def _token_inputs(
    q_BTHL: torch.Tensor,
    latent_BSL: torch.Tensor,
    rows_NK: torch.Tensor,
    keep_BTK: torch.Tensor,
    chunk_n: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A chunk's scaled queries [n,H,L], gathered latent rows [n,K,L] and visibility [n,K]."""
    L, K = latent_BSL.shape[-1], rows_NK.shape[-1]
    rows_nKL = latent_BSL.reshape(-1, L).index_select(0, rows_NK[chunk_n].reshape(-1)).view(-1, K, L)
    q_nHL = q_BTHL.reshape(-1, *q_BTHL.shape[2:]).index_select(0, chunk_n) * scale
    return q_nHL, rows_nKL, keep_BTK.reshape(-1, K).index_select(0, chunk_n)


def attend_blocks(
    q_BTHE: torch.Tensor,
    k_BHSE: torch.Tensor,
    v_BHSV: torch.Tensor,
    selection: Plan,
    scale: float,
    dist_BTK: torch.Tensor,
) -> torch.Tensor:
    """Output [B,T,H,V] of the plan's blocks (expanded form; 0 elsewhere); fills their tokens'
    rows of ``dist_BTK`` with the heads' mean distribution over the K selected (no gradient)."""
    return _Blocks.apply(q_BTHE, k_BHSE, v_BHSV, selection.blocks, scale, dist_BTK)


def attend_tokens(
    q_BTHL: torch.Tensor,
    latent_BSL: torch.Tensor,
    idx_BTK: torch.Tensor,
    keep_BTK: torch.Tensor,
    selection: Plan,
    scale: float,
    C: int,
    dist_BTK: torch.Tensor,
) -> torch.Tensor:
    """Latent output [B,T,H,C] of the plan's per-token queries (absorbed form; 0 elsewhere); fills
    their rows of ``dist_BTK`` as ``attend_blocks`` does."""
    return _Tokens.apply(q_BTHL, latent_BSL, idx_BTK, keep_BTK, selection.tokens_N, scale, C, dist_BTK)
