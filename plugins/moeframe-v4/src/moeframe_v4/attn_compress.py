"""Token compression for DeepSeek-V4's long-range attention, and the lightning indexer of CSA.

Why compress. A sliding window alone forgets everything older than ``n_win`` tokens; full
attention over a million tokens is too expensive to read at every step. V4 keeps the window and
adds *compressed entries*: every ``m`` consecutive tokens are pooled into one entry of the head
width, and every query also attends to the entries of windows it has fully seen. Heavily
compressed attention (HCA) pools ``m'`` = 128 tokens per entry and attends to all of them; the
cache then grows by 1/128 of a token per token.

How a window is pooled. Each token contributes a value row ``C = x·W_kv`` and a gate row
``Z = x·W_z``; a learned bias ``B`` per slot of the window is added to the gates, and the entry is
the per-channel softmax-weighted sum over the window, ``Σ_j softmax_j(Z_j + B_j) ⊙ C_j``, then
RMS-normalised. It is rotated at the position of its window's first token, so that a query's
product with it depends on the distance only.

Compressed sparse attention (CSA, ``m`` = 4) pools *overlapping* windows: every token emits two
series; entry ``w`` pools the first series of window ``w-1`` together with the second series of
window ``w`` (``2m`` slots, stride ``m``), so no boundary cuts context in half. Entry 0 has no
previous window: those slots get weight 0. At 1/4 of the tokens there are still too many entries
to read all of them, so a small *lightning indexer* picks ``index_topk`` entries per query: it
runs its own (narrower) compressor, scores ``Σ_h w_{t,h} · ReLU(q_{t,h} · k_s)`` with a few cheap
heads whose queries come from the attention's low-rank query latent, and keeps the best. Exact
ties (all heads below zero: score 0) go to the earlier entry, so that decoding picks what the
full forward picks; transformers' ``topk`` breaks them arbitrarily.

Causality. Entry ``w`` summarises tokens up to ``(w+1)·m - 1``; the query at position ``t`` may
read it only when that window is complete, ``(w+1)·m ≤ t + 1``. Unfinished windows wait in the
cache (``PoolState``) until their last token arrives.

Shapes: B batch, T new tokens, D model width, m compress rate, n windows pooled now, N entries
in all, c entry width, K = c (HCA) or 2c (CSA: two series per token), Q q_lora_rank, I indexer
heads, i indexer head width, P rotated channel pairs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moeframe.plugin import RMSNorm, default_init
from moeframe_v4.attn_rope import apply_rope_tail, rope_cos_sin_P

__all__ = ["Compressor", "Indexer", "PoolState"]


class PoolState:
    """What one compressor keeps while decoding, preallocated: the tokens of the unfinished window,
    the entries emitted so far (at most ``max_len // m``), and for overlapping windows the first
    series of the last complete window (entry ``w`` needs it when window ``w`` completes later)."""

    def __init__(
        self,
        batch_size: int,
        rate: int,
        width: int,
        overlap: bool,
        max_len: int,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        K = 2 * width if overlap else width
        self.rate, self.width, self.overlap = rate, width, overlap
        self.pending_kv_BmK = torch.zeros(batch_size, rate, K, device=device, dtype=dtype)
        self.pending_gate_BmK = torch.zeros(batch_size, rate, K, device=device, dtype=torch.float32)
        self.num_pending = 0
        self.entries_BNc = torch.zeros(batch_size, max_len // rate, width, device=device, dtype=dtype)
        self.num_entries = 0
        self.prior_kv_Bmc = torch.zeros(batch_size, rate, width, device=device, dtype=dtype) if overlap else None
        self.prior_gate_Bmc = (
            torch.zeros(batch_size, rate, width, device=device, dtype=torch.float32) if overlap else None
        )
        self.has_prior = False

    def tensors(self) -> list[torch.Tensor]:
        extra = [self.prior_kv_Bmc, self.prior_gate_Bmc] if self.overlap else []
        return [self.pending_kv_BmK, self.pending_gate_BmK, self.entries_BNc] + [t for t in extra if t is not None]

    def take_windows(self, kv_BTK: torch.Tensor, gate_BTK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Prepend the waiting tokens, keep the unfinished tail waiting; return the complete windows
        and the index of the first entry they will become."""
        kv_BLK = torch.cat((self.pending_kv_BmK[:, : self.num_pending], kv_BTK), dim=1)
        gate_BLK = torch.cat((self.pending_gate_BmK[:, : self.num_pending], gate_BTK.float()), dim=1)
        usable = kv_BLK.shape[1] // self.rate * self.rate
        self.num_pending = kv_BLK.shape[1] - usable
        self.pending_kv_BmK[:, : self.num_pending] = kv_BLK[:, usable:]
        self.pending_gate_BmK[:, : self.num_pending] = gate_BLK[:, usable:]
        return kv_BLK[:, :usable], gate_BLK[:, :usable], self.num_entries

    def prior(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        if not self.has_prior:
            return None
        assert self.prior_kv_Bmc is not None and self.prior_gate_Bmc is not None
        return self.prior_kv_Bmc, self.prior_gate_Bmc

    def set_prior(self, kv_Bmc: torch.Tensor, gate_Bmc: torch.Tensor) -> None:
        assert self.prior_kv_Bmc is not None and self.prior_gate_Bmc is not None
        self.prior_kv_Bmc.copy_(kv_Bmc)
        self.prior_gate_Bmc.copy_(gate_Bmc)
        self.has_prior = True

    def store(self, entries_Bnc: torch.Tensor) -> torch.Tensor:
        """Append new entries; return every entry so far [B, N, c] (a view)."""
        end = self.num_entries + entries_Bnc.shape[1]
        assert end <= self.entries_BNc.shape[1], "the cache's reserve() bounds the tokens, hence the entries"
        self.entries_BNc[:, self.num_entries : end] = entries_Bnc
        self.num_entries = end
        return self.entries_BNc[:, :end]


class Compressor(nn.Module):
    """Pools windows of ``rate`` tokens into entries of width ``width`` (see the module docstring).

    Parameter names are HF transformers' (``kv_proj``, ``gate_proj``, ``position_bias``,
    ``kv_norm``), so the checkpoint mapping is one to one."""

    def __init__(self, dim: int, width: int, rate: int, overlap: bool, eps: float) -> None:
        super().__init__()
        K = 2 * width if overlap else width
        self.rate, self.width, self.overlap = rate, width, overlap
        self.kv_proj = nn.Linear(dim, K, bias=False)
        self.gate_proj = nn.Linear(dim, K, bias=False)
        # one learned gate bias per slot of a window; fp32 like the checkpoints keep it
        self.position_bias = nn.Parameter(torch.zeros(rate, K, dtype=torch.float32))
        self.kv_norm = RMSNorm(width, eps)

    def init_weights(self, std: float) -> None:
        default_init(self, std)
        nn.init.zeros_(self.position_bias)  # start with plain averaging over the window

    def new_state(self, batch_size: int, max_len: int, device: torch.device, dtype: torch.dtype) -> PoolState:
        return PoolState(batch_size, self.rate, self.width, self.overlap, max_len, device, dtype)

    def entries(
        self, x_BTD: torch.Tensor, inv_freq_P: torch.Tensor, state: PoolState | None, origin: torch.Tensor
    ) -> torch.Tensor:
        """All entries readable after these tokens, rotated: [B, N, c].

        Without a state (training) the windows of ``x_BTD`` itself, a trailing partial window
        dropped; ``origin`` is the position of its first token. With a state (decoding) the
        entries of every window completed so far, positions counted from 0."""
        kv_BTK, gate_BTK = self.kv_proj(x_BTD), self.gate_proj(x_BTD)
        if state is None:
            usable = kv_BTK.shape[1] // self.rate * self.rate
            kv_BLK, gate_BLK, first, prior = kv_BTK[:, :usable], gate_BTK[:, :usable], 0, None
        else:
            prior = state.prior()
            kv_BLK, gate_BLK, first = state.take_windows(kv_BTK, gate_BTK)
        n = kv_BLK.shape[1] // self.rate
        B = x_BTD.shape[0]
        if n == 0:
            new_Bnc = kv_BTK.new_zeros(B, 0, self.width)
        else:
            pooled_Bnc, last = self._pool(
                kv_BLK.unflatten(1, (n, self.rate)), gate_BLK.unflatten(1, (n, self.rate)), prior
            )
            window_start_n = origin + (first + torch.arange(n, device=x_BTD.device)) * self.rate
            new_Bnc = apply_rope_tail(pooled_Bnc, *rope_cos_sin_P(window_start_n, inv_freq_P))
            if state is not None and last is not None:
                state.set_prior(*last)
        return new_Bnc if state is None else state.store(new_Bnc)

    def _pool(
        self, kv_BnmK: torch.Tensor, gate_BnmK: torch.Tensor, prior: tuple[torch.Tensor, torch.Tensor] | None
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """Softmax-gated sums over each window's slots, normalised: [B, n, c]; and, for overlapping
        windows, the last window's first series (values, biased gates) for the next call."""
        gate_BnmK = gate_BnmK.float() + self.position_bias
        if not self.overlap:
            slots_kv, slots_gate, last = kv_BnmK, gate_BnmK, None
        else:
            slots_kv, slots_gate = self._overlap_slots(kv_BnmK, gate_BnmK, prior)
            c = self.width
            last = (kv_BnmK[:, -1, :, :c], gate_BnmK[:, -1, :, :c])
        weights = slots_gate.softmax(dim=2).to(slots_kv.dtype)
        return self.kv_norm((slots_kv * weights).sum(dim=2)), last

    def _overlap_slots(
        self, kv_BnmK: torch.Tensor, gate_BnmK: torch.Tensor, prior: tuple[torch.Tensor, torch.Tensor] | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, n, 2m, c]: window w-1's first series, then window w's second series."""
        B, _, m, _ = kv_BnmK.shape
        c = self.width
        if prior is None:  # nothing before the first window: value 0 at weight exp(-inf) = 0
            prev_kv_B1mc = kv_BnmK.new_zeros(B, 1, m, c)
            prev_gate_B1mc = gate_BnmK.new_full((B, 1, m, c), float("-inf"))
        else:
            prev_kv_B1mc, prev_gate_B1mc = prior[0][:, None].to(kv_BnmK.dtype), prior[1][:, None]
        prev_kv = torch.cat((prev_kv_B1mc, kv_BnmK[:, :-1, :, :c]), dim=1)
        prev_gate = torch.cat((prev_gate_B1mc, gate_BnmK[:, :-1, :, :c]), dim=1)
        return (torch.cat((prev_kv, kv_BnmK[..., c:]), dim=2), torch.cat((prev_gate, gate_BnmK[..., c:]), dim=2))


class Indexer(Compressor):
    """The lightning indexer of CSA: its own overlapping compressor at width ``head_dim`` and
    ``num_heads`` cheap ReLU scoring heads; ``select`` keeps the ``topk`` best readable entries."""

    def __init__(
        self, dim: int, q_lora_rank: int, num_heads: int, head_dim: int, topk: int, rate: int, eps: float
    ) -> None:
        super().__init__(dim, head_dim, rate, overlap=True, eps=eps)
        self.num_heads, self.head_dim, self.topk = num_heads, head_dim, topk
        self.q_b_proj = nn.Linear(q_lora_rank, num_heads * head_dim, bias=False)
        self.weights_proj = nn.Linear(dim, num_heads, bias=False)

    def select(
        self,
        x_BTD: torch.Tensor,
        q_latent_BTQ: torch.Tensor,
        cos_TP: torch.Tensor,
        sin_TP: torch.Tensor,
        readable_BTN: torch.Tensor,
        inv_freq_P: torch.Tensor,
        state: PoolState | None,
        origin: torch.Tensor,
    ) -> torch.Tensor:
        """Boolean [B, T, N]: the entries each query attends to (top-k by score among the readable)."""
        keys_BNi = self.entries(x_BTD, inv_freq_P, state, origin)
        N = keys_BNi.shape[1]
        if N == 0:
            return readable_BTN
        B, T, _ = x_BTD.shape
        q_BTIi = self.q_b_proj(q_latent_BTQ).view(B, T, self.num_heads, self.head_dim)
        q_BTIi = apply_rope_tail(q_BTIi, cos_TP[:, None], sin_TP[:, None])
        relu_BTIN = F.relu(torch.einsum("btji,bni->btjn", q_BTIi.float(), keys_BNi.float())) * self.head_dim**-0.5
        head_weight_BTI = self.weights_proj(x_BTD).float() * self.num_heads**-0.5
        score_BTN = (relu_BTIN * head_weight_BTI[..., None]).sum(dim=2).masked_fill(~readable_BTN, float("-inf"))
        # ties are real: an entry every head scores below zero scores exactly 0 after the ReLU. topk
        # breaks ties arbitrarily, and differently for the N entries of a full forward than for the
        # fewer of a decoding step; a stable sort keeps the earlier entry, the same in both
        top_BTk = score_BTN.sort(dim=-1, descending=True, stable=True).indices[..., : self.topk]
        chosen_BTN = torch.zeros_like(readable_BTN).scatter_(-1, top_BTk, True)
        return chosen_BTN & readable_BTN
