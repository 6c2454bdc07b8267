"""Manifold-constrained hyper-connections (mHC, DeepSeek-V4 §2.2), registered as residual ``hyper``.

The residual stream becomes ``n = hc_mult`` parallel streams ``h`` [B, T, n, D]. Around each
sublayer f (attention, then the FFN) a small per-token projection of the flattened, RMS-normalised
streams gives three mixings:

- ``pre`` [n]: collapses the streams into the sublayer's input ``x = Σ_i pre_i h_i``
  (``sigmoid(.) + eps``),
- ``post`` [n]: spreads the sublayer's output back over the streams (``2 · sigmoid(.)``),
- ``comb`` [n, n]: mixes the streams themselves; projected (Sinkhorn-Knopp, ``sinkhorn_iters``)
  close to a doubly-stochastic matrix so that the mixing neither grows nor shrinks the stream
  norm over depth.

and the next state is ``h'_k = post_k f(x) + Σ_j comb_jk h_j``. Each of the three comes from its
slice of one projection ``fn`` [(2 + n) n, n D] scaled by its own ``scale`` and shifted by
``base``. The embedding enters as n copies (``expand``); after the last block a learned
``head`` (the HF ``hc_head``: ``pre``-style weights from its own projection) collapses the streams
into the [B, T, D] state the final norm receives (``reduce``), so the head's parameters live on
the last block's residual (and on each MTP block's, which reduces its own).
Everything is per token, so decoding with a cache equals the full forward.

Multi-token prediction in the release's form (``mtp_streams: true``; DeepSeek-V4's released MTP
layer, as its public inference code and vLLM run it): depth k receives the previous block's n
streams ``h`` unreduced, not the collapsed state. Every stream is normalised and projected on its
own, and the projected embedding of the token k ahead is added to each:
``h^0_i = e_proj(enorm(Emb(t_{i+k}))) + h_proj(hnorm(h_i))`` for stream i, then the MTP block
(its own mixings), then its own ``hc_head`` collapses the streams for its final norm and the
shared output head, and the next depth again receives the streams. moeframe's ``eh_proj``
[D, 2D] holds ``[e_proj, h_proj]`` side by side, so ``eh_proj([enorm(e); hnorm(h_i)])`` per stream
is the same computation with the same parameters; the V4 family writes and reads the two halves
under the release's names. ``mtp_streams: false`` (the default, what configs written before it
existed compute) runs DeepSeek-V3's MTP on the collapsed state instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from moeframe.plugin import ForwardContext, ModelConfig, MTPCombine, PluginOptions, ResidualBase, Sublayer

__all__ = ["HyperConnections", "HyperOptions", "sinkhorn"]


@dataclass
class HyperOptions(PluginOptions):
    """``hc_mult``: streams n (V4: 4); ``sinkhorn_iters``: Sinkhorn-Knopp iterations (V4: 20);
    ``eps``: the floor added to the mixings and to the Sinkhorn denominators (HF ``hc_eps``);
    ``mtp_streams``: multi-token prediction on the streams as DeepSeek-V4's release does it (true;
    needed to import or export the release's MTP layers) or on the collapsed state (false)."""

    hc_mult: int = 4
    sinkhorn_iters: int = 20
    eps: float = 1e-6
    mtp_streams: bool = False  # MTP on the n streams, as the V4 release (module docstring)

    def validate(self, config: ModelConfig) -> None:
        if self.hc_mult < 1:
            raise ValueError(f"residual hyper: hc_mult must be >= 1, got {self.hc_mult}")
        if self.sinkhorn_iters < 1:
            raise ValueError(f"residual hyper: sinkhorn_iters must be >= 1, got {self.sinkhorn_iters}")


def sinkhorn(m_BTnn: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """Alternately normalise columns and rows to sum to one, starting and ending with columns
    (``iters`` column passes in all), as the V4 reference does."""
    m_BTnn = m_BTnn / (m_BTnn.sum(dim=-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        m_BTnn = m_BTnn / (m_BTnn.sum(dim=-1, keepdim=True) + eps)
        m_BTnn = m_BTnn / (m_BTnn.sum(dim=-2, keepdim=True) + eps)
    return m_BTnn


def _normed_flat(h_BTnD: torch.Tensor, eps: float) -> torch.Tensor:
    """The n streams flattened to [B, T, n D] in fp32 and RMS-normalised (no learned scale)."""
    flat = h_BTnD.flatten(2).float()
    return flat * torch.rsqrt(flat.square().mean(-1, keepdim=True) + eps)


class _Mixer(nn.Module):
    """One sublayer's mixing projection: ``fn`` [(2 + n) n, n D], ``base`` [(2 + n) n], ``scale`` [3]."""

    def __init__(self, n: int, dim: int) -> None:
        super().__init__()
        self.n = n
        self.fn = nn.Parameter(torch.empty((2 + n) * n, n * dim))
        self.base = nn.Parameter(torch.empty((2 + n) * n))
        self.scale = nn.Parameter(torch.empty(3))

    @torch.no_grad()
    def init_weights(self, std: float) -> None:
        nn.init.normal_(self.fn, mean=0.0, std=std)
        nn.init.zeros_(self.base)
        nn.init.ones_(self.scale)  # the three mixings start at unit temperature

    def forward(
        self, h_BTnD: torch.Tensor, norm_eps: float, eps: float, iters: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(pre [B, T, n], post [B, T, n], comb [B, T, n, n]) in fp32."""
        n = self.n
        mixes = F.linear(_normed_flat(h_BTnD, norm_eps), self.fn.float())
        pre_w, post_w, comb_w = mixes.split([n, n, n * n], dim=-1)
        pre_b, post_b, comb_b = self.base.float().split([n, n, n * n])
        s_pre, s_post, s_comb = self.scale.float().unbind(0)
        pre = torch.sigmoid(pre_w * s_pre + pre_b) + eps
        post = 2 * torch.sigmoid(post_w * s_post + post_b)
        comb = torch.softmax((comb_w * s_comb + comb_b).unflatten(-1, (n, n)), dim=-1) + eps
        return pre, post, sinkhorn(comb, iters, eps)


class _Head(nn.Module):
    """The final collapse of the streams (HF ``hc_head``): ``hc_fn`` [n, n D], ``hc_base`` [n],
    ``hc_scale`` [1]."""

    def __init__(self, n: int, dim: int) -> None:
        super().__init__()
        self.hc_fn = nn.Parameter(torch.empty(n, n * dim))
        self.hc_base = nn.Parameter(torch.empty(n))
        self.hc_scale = nn.Parameter(torch.empty(1))

    @torch.no_grad()
    def init_weights(self, std: float) -> None:
        nn.init.normal_(self.hc_fn, mean=0.0, std=std)
        nn.init.zeros_(self.hc_base)
        nn.init.ones_(self.hc_scale)

    def forward(self, h_BTnD: torch.Tensor, norm_eps: float, eps: float) -> torch.Tensor:
        mixes = F.linear(_normed_flat(h_BTnD, norm_eps), self.hc_fn.float())
        pre_BTn = torch.sigmoid(mixes * self.hc_scale.float() + self.hc_base.float()) + eps
        return (pre_BTn.unsqueeze(-1) * h_BTnD).sum(dim=2).to(h_BTnD.dtype)


class HyperConnections(ResidualBase):
    """``hc_mult`` residual streams mixed around each sublayer (module docstring)."""

    Options = HyperOptions
    plugin_api = "2"

    def __init__(self, config: ModelConfig, options: HyperOptions, layer_id: int) -> None:
        super().__init__(config, options, layer_id)
        self.n = options.hc_mult
        self.iters = options.sinkhorn_iters
        self.eps = options.eps
        self.mtp_streams = options.mtp_streams
        self.norm_eps = config.norm_eps
        self.attn_hc = _Mixer(self.n, config.dim)
        self.ffn_hc = _Mixer(self.n, config.dim)
        # the last main block reduces the streams for the head; every MTP block reduces its own
        self.head: _Head | None = _Head(self.n, config.dim) if layer_id >= config.n_layers - 1 else None

    def expand(self, x_BTD: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        return x_BTD.unsqueeze(2).expand(-1, -1, self.n, -1).contiguous()

    def reduce(self, h_BTnD: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        if self.head is None:
            raise ValueError("residual hyper: only the last block's (or an MTP block's) residual reduces the streams")
        return self.head(h_BTnD, self.norm_eps, self.eps)

    def mtp_carry(self, h: torch.Tensor, x_BTD: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        return h if self.mtp_streams else x_BTD

    def mtp_input(
        self, carry: torch.Tensor, emb_BTD: torch.Tensor, combine: MTPCombine, ctx: ForwardContext
    ) -> torch.Tensor:
        if not self.mtp_streams:
            return super().mtp_input(carry, emb_BTD, combine, ctx)
        if carry.dim() != 4 or carry.shape[2] != self.n:
            raise ValueError(
                f"residual hyper (mtp_streams): the MTP block needs the previous block's {self.n} streams, got a "
                f"state of shape {tuple(carry.shape)}; give the last layer and the MTP blocks the same residual options"
            )
        # every stream gets the same token-ahead embedding: e_proj(enorm(e)) + h_proj(hnorm(h_i))
        return combine(emb_BTD.unsqueeze(2).expand_as(carry), carry)

    def _around(self, mixer: _Mixer, h_BTnD: torch.Tensor, sublayer: Sublayer) -> torch.Tensor:
        pre, post, comb = mixer(h_BTnD, self.norm_eps, self.eps, self.iters)
        x_BTD = (pre.unsqueeze(-1) * h_BTnD).sum(dim=2).to(h_BTnD.dtype)
        y_BTD = sublayer(x_BTD)
        dtype = h_BTnD.dtype
        # h'_k = post_k · y + Σ_j comb_jk h_j  (comb is applied transposed: it is not symmetric)
        return post.to(dtype).unsqueeze(-1) * y_BTD.unsqueeze(-2) + comb.to(dtype).transpose(-1, -2) @ h_BTnD

    def forward(self, h: torch.Tensor, attention: Sublayer, ffn: Sublayer, ctx: ForwardContext) -> torch.Tensor:
        h = self._around(self.attn_hc, h, attention)
        return self._around(self.ffn_hc, h, ffn)

    @classmethod
    def hf_tensor_names(cls, family: str) -> dict[str, str | None]:
        # V4 folders: hc_attn_fn ... on the layer, the head as hc_head_* (the family places it)
        names: dict[str, str | None] = {}
        for part in ("attn", "ffn"):
            for leaf in ("fn", "base", "scale"):
                names[f"{part}_hc.{leaf}"] = f"hc_{part}_{leaf}"
        for leaf in ("fn", "base", "scale"):
            names[f"head.hc_{leaf}"] = f"hc_head_{leaf}"
        return names

    @classmethod
    def hf_config(cls, family: str, config: ModelConfig, options: Any) -> dict[str, Any]:
        return {"hc_mult": options.hc_mult, "hc_sinkhorn_iters": options.sinkhorn_iters, "hc_eps": options.eps}

    @classmethod
    def options_from_hf(cls, family: str, hf: dict[str, Any]) -> dict[str, Any]:
        return {
            "hc_mult": int(hf.get("hc_mult", 4)),
            "sinkhorn_iters": int(hf.get("hc_sinkhorn_iters", 20)),
            "eps": float(hf.get("hc_eps", 1e-6)),
        }
