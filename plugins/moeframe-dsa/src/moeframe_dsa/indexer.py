"""The lightning indexer of DeepSeek Sparse Attention (DeepSeek-V3.2-Exp report, §2.1).

What it computes. For query token t and every visible token s, an index score

    I[t, s] = Σ_g  w[t, g] · ReLU(q[t, g] · k[s])

with G few heads (64 in the release, against MLA's 128), each of width I (128): per-head queries
``q[t, g]`` up-projected from MLA's normalised query latent (``wq_b``; the indexer has no query
down-projection of its own), ONE key per token shared by all heads (``wk`` then a LayerNorm), and a
per-token weight of each head (``weights_proj``, from the block's input). ReLU instead of softmax:
the score only has to rank tokens, and ReLU is cheap and FP8-friendly (the release scores in FP8).
MLA then attends only to the ``index_topk`` best-scored tokens of each query.

Position. The first R channels of the indexer's query and key (R = MLA's ``qk_rope_head_dim``) are
rotated, with the same frequencies as MLA but in the rotate-half pairing (channel i with i + R/2),
NOT MLA's interleaved one: the released weights were trained that way. The rotated slice comes
first, the position-free rest after it (MLA: the other way round).

Why its own key cache. The index keys depend on each token alone, so decoding caches them next to
MLA's latent row (I more values per token: 128 beside V3's 576) instead of recomputing them.

The release also applies a Hadamard rotation to q and k before an FP8 cast; orthogonal, so it
leaves q·k unchanged and is omitted here (as in transformers' reference implementation).

Shapes: B batch, T queries, S visible (cached) tokens, D model width, Q q_lora_rank, G indexer
heads, I indexer head width, R rope channels, P = R/2 rope pairs.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from moeframe_dsa.selected import union
from moeframe_mla import rotate

__all__ = ["QUERY_CHUNK", "LightningIndexer", "score_chunk", "selected_scores"]

# queries scored per chunk: bounds the [B, t, G, S] intermediate at long contexts
QUERY_CHUNK = 512


class LightningIndexer(nn.Module):
    """Scores every visible token for every query; parameter names as in the released checkpoints."""

    def __init__(self, dim: int, q_lora_rank: int, n_heads: int, head_dim: int, rope_dim: int) -> None:
        super().__init__()
        self.n_heads, self.head_dim, self.rope_dim = n_heads, head_dim, rope_dim
        self.wq_b = nn.Linear(q_lora_rank, n_heads * head_dim, bias=False)
        self.wk = nn.Linear(dim, head_dim, bias=False)
        self.k_norm = nn.LayerNorm(head_dim, eps=1e-6)  # a LayerNorm (with bias), not an RMSNorm
        self.weights_proj = nn.Linear(dim, n_heads, bias=False)
        self.softmax_scale = head_dim**-0.5

    def _rotate_first(self, x_BTHI: torch.Tensor, cos_TP: torch.Tensor, sin_TP: torch.Tensor) -> torch.Tensor:
        rot, rest = x_BTHI.split([self.rope_dim, self.head_dim - self.rope_dim], dim=-1)
        return torch.cat((rotate(rot, cos_TP, sin_TP, interleaved=False), rest), dim=-1)

    def keys(self, x_BTD: torch.Tensor, cos_TP: torch.Tensor, sin_TP: torch.Tensor) -> torch.Tensor:
        """The shared index key of each token [B, T, I] (what the cache stores)."""
        k_BTI = self.k_norm(self.wk(x_BTD))
        return self._rotate_first(k_BTI[:, :, None], cos_TP, sin_TP)[:, :, 0]

    def queries(
        self, x_BTD: torch.Tensor, q_latent_BTQ: torch.Tensor, cos_TP: torch.Tensor, sin_TP: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-head queries [B, T, G, I] and head weights [B, T, G], in fp32 (the scores' precision)."""
        B, T, _ = x_BTD.shape
        q_BTGI = self._rotate_first(self.wq_b(q_latent_BTQ).view(B, T, self.n_heads, self.head_dim), cos_TP, sin_TP)
        # the head weights fold in both scales: 1/sqrt(G) over heads and the dot product's 1/sqrt(I)
        w_BTG = self.weights_proj(x_BTD).float() * (self.n_heads**-0.5 * self.softmax_scale)
        return q_BTGI.float(), w_BTG

    def scores(
        self,
        x_BTD: torch.Tensor,
        q_latent_BTQ: torch.Tensor,
        k_BSI: torch.Tensor,
        cos_TP: torch.Tensor,
        sin_TP: torch.Tensor,
    ) -> torch.Tensor:
        """Index scores I [B, T, S] in fp32 of every query against every cached key (the T queries
        are the last T of the S tokens). Keys after a query are not scored (causal: their score is
        0 here) and the caller hides every invisible token."""
        T, S = x_BTD.shape[1], k_BSI.shape[1]
        q_BTGI, w_BTG = self.queries(x_BTD, q_latent_BTQ, cos_TP, sin_TP)
        k_BSI = k_BSI.float()
        chunks = []
        for t in range(0, T, QUERY_CHUNK):
            seen = S - T + min(T, t + QUERY_CHUNK)  # keys up to the chunk's last query
            scores_BtS = score_chunk(q_BTGI[:, t : t + QUERY_CHUNK], w_BTG[:, t : t + QUERY_CHUNK], k_BSI[:, :seen])
            chunks.append(F.pad(scores_BtS, (0, S - seen)))
        return torch.cat(chunks, dim=1)


def _score_chunk(q_BtGI: torch.Tensor, w_BtG: torch.Tensor, k_BSI: torch.Tensor) -> torch.Tensor:
    # ReLU(a·s) = s·ReLU(a) for s > 0: the scale sits in the weights. In place: the largest
    # tensor of the indexer, and a fresh one costs more than the ReLU (einsum needs only its inputs)
    dots_BtGS = torch.einsum("btgi,bsi->btgs", q_BtGI, k_BSI).relu_()
    return torch.einsum("btg,btgs->bts", w_BtG, dots_BtGS)


def score_chunk(q_BtGI: torch.Tensor, w_BtG: torch.Tensor, k_BSI: torch.Tensor) -> torch.Tensor:
    """Index scores [B, t, S] of a chunk of queries; in training recomputed in backward, so the
    [B, t, G, S] ReLU inputs are never kept."""
    if torch.is_grad_enabled():
        return checkpoint(_score_chunk, q_BtGI, w_BtG, k_BSI, use_reentrant=False)
    return _score_chunk(q_BtGI, w_BtG, k_BSI)


class _Rescored(torch.autograd.Function):
    """The selected keys' scores [B, t, K], already computed by the selection (passed as
    ``values_BtK``), with their gradient: backward recomputes the chunk's scores and takes the
    gradient of the selected ones against the keys selected at all (the union), so scoring runs
    once over all keys per chunk (the selection) and once over the union (backward), and no
    [B, t, G, S] tensor is kept between them."""

    @staticmethod
    def forward(
        ctx: Any,
        q_BtGI: torch.Tensor,
        w_BtG: torch.Tensor,
        k_BSI: torch.Tensor,
        idx_BtK: torch.Tensor,
        values_BtK: torch.Tensor,
    ) -> torch.Tensor:
        ctx.save_for_backward(q_BtGI, w_BtG, k_BSI, idx_BtK)
        return values_BtK.clone()

    @staticmethod
    def backward(ctx: Any, grad_BtK: torch.Tensor) -> tuple[Any, ...]:
        q_BtGI, w_BtG, k_BSI, idx_BtK = (t.detach().requires_grad_(t.requires_grad) for t in ctx.saved_tensors)
        inputs = [t for t in (q_BtGI, w_BtG, k_BSI) if t.requires_grad]
        # only the keys that some query of the chunk selected get a gradient: rescore those U
        # (about K + t when neighbouring queries select alike, at most the chunk's S)
        rows_U, place_BtK = union(idx_BtK, k_BSI.shape[1])
        with torch.enable_grad():
            selected_BtK = _score_chunk(q_BtGI, w_BtG, k_BSI.index_select(1, rows_U)).gather(-1, place_BtK)
        grads = iter(torch.autograd.grad(selected_BtK, inputs, grad_BtK)) if inputs else iter(())
        return (*(next(grads) if t.requires_grad else None for t in (q_BtGI, w_BtG, k_BSI)), None, None)


def selected_scores(
    q_BtGI: torch.Tensor, w_BtG: torch.Tensor, k_BSI: torch.Tensor, idx_BtK: torch.Tensor, values_BtK: torch.Tensor
) -> torch.Tensor:
    """Index scores of the selected keys [B, t, K] with gradient (their values ``values_BtK`` as the
    selection computed them): the chunk's [B, t, S] scores exist only inside the selection and
    inside backward, so no dense score tensor or gradient outlives either."""
    if torch.is_grad_enabled():
        return _Rescored.apply(q_BtGI, w_BtG, k_BSI, idx_BtK, values_BtK)
    return values_BtK
