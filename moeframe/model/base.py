"""Plugin contracts: the base class of each model-part kind and its typed options.

A plugin is an ``nn.Module`` subclass of one of these bases with a nested ``Options`` dataclass.
The model config names the plugin and its options in one mapping, e.g.
``attention: {name: mha, n_kv_heads: 2}``; :func:`parse_options` turns the rest of that mapping
into the plugin's ``Options`` before anything is allocated, so a wrong field fails at config time
with the plugin's name, the field and the fields that exist.

Shape legend used across moeframe: B batch, T sequence, D model width, H heads, K experts per
token, E experts, F expert/FFN width, V vocabulary, N tokens routed (T·K after flattening),
S tokens held by a KV cache (the cached ones plus the T new ones).

Plugin API 2 (this release): every model-part plugin also receives the forward context
(:class:`moeframe.model.context.ForwardContext`: layer index, token ids, positions, document ids,
the cache while decoding, the training step) and its layer index at construction. A plugin
declares the API it targets with ``plugin_api = "2"``; plugins of API 1 (``"1"`` or nothing
declared) keep their old signatures, with one deprecation warning (``moeframe.model.compat``).
"""

from __future__ import annotations

import abc
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from moeframe.model.context import ForwardContext
from moeframe.model.hfnames import HFNamed
from moeframe.options import PluginOptions, describe_type, options_as_config, parse_options  # noqa: F401 (their home before)
from moeframe.registry import PluginDeprecationWarning  # noqa: F401 (one class for every API-1 warning)

if TYPE_CHECKING:
    from moeframe.config import ModelConfig


_warned_api1: set[tuple[type, str]] = set()


def _api1_attribute(module: nn.Module, attr: str, fix: str) -> bool:
    """Whether ``module`` carries the API-1 instance attribute ``attr``.

    Plugin API 1 declared optional capabilities as instance attributes that the core probed with
    ``hasattr`` (``recompute``, ``recompute_up_projections``, ``grouped_gemm``). API 2 declares
    them as methods of the base classes; the base methods' defaults still honour the old
    attribute for this release, with one warning per class saying what to write instead (``fix``)."""
    if attr not in vars(module):
        return False
    key = (type(module), attr)
    if key not in _warned_api1:
        _warned_api1.add(key)
        cls = f"{type(module).__module__}.{type(module).__qualname__}"
        warnings.warn(
            f"{cls}: the attribute {attr!r} is plugin API 1, honoured for one more release; {fix} (moeframe.plugin)",
            PluginDeprecationWarning,
            stacklevel=3,
        )
    return True


class AttentionCache:
    """What one attention layer keeps of past tokens so that decoding never recomputes them.

    The cache owns the position counter: ``length`` tokens are stored, so the next tokens sit at
    positions ``length, length + 1, ...``. A plugin subclasses it with its own tensors,
    preallocated for ``max_len`` tokens (no re-allocation while decoding), and lists them in
    ``tensors()`` so that ``nbytes()`` measures what the cache really holds.
    """

    def __init__(self, batch_size: int, max_len: int) -> None:
        if batch_size <= 0 or max_len <= 0:
            raise ValueError(f"a cache needs batch_size > 0 and max_len > 0, got {batch_size}, {max_len}")
        self.batch_size = batch_size
        self.max_len = max_len
        self.length = 0

    def tensors(self) -> list[torch.Tensor]:
        """The storage of the cache (subclasses list every tensor they allocate)."""
        return []

    def nbytes(self) -> int:
        """Bytes of storage held, measured on the tensors (shared storage counted once)."""
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in self.tensors()}
        return sum(storages.values())

    def reserve(self, num_new: int) -> tuple[int, int]:
        """Claim room for ``num_new`` tokens; return the slice ``(start, end)`` they occupy.

        Raises ValueError when the cache is full: silently overwriting old tokens would
        make decoding wrong without a trace.
        """
        start, end = self.length, self.length + num_new
        if end > self.max_len:
            raise ValueError(
                f"KV cache overflow: {self.length} tokens cached + {num_new} new > max_len={self.max_len}; "
                "create the cache with a larger max_len (at most model.max_seq_len)"
            )
        self.length = end
        return start, end


def causal_pair_count(seq_len: int, stride: int = 1, cap: int | None = None) -> int:
    """(query, key) pairs of one causal sequence when the query at position t sees
    ``min(cap, (t + 1) // stride)`` keys: ``stride`` 1 = every token up to itself, ``stride`` m = the
    compressed entries of m tokens completed by then, ``cap`` = a window or a top-k. Closed form, so
    that a million-token context costs nothing to count."""
    if seq_len < 0 or stride < 1 or (cap is not None and cap < 0):
        raise ValueError(f"causal_pair_count needs seq_len >= 0, stride >= 1, cap >= 0; got {seq_len}, {stride}, {cap}")
    top = seq_len // stride  # keys the last query sees, uncapped
    if cap is None or top <= cap:
        # key count j (0 <= j < top) is seen by `stride` queries, `top` by the last seq_len % stride + 1
        return stride * top * (top - 1) // 2 + top * (seq_len % stride + 1)
    # counts below cap as above; every query from position cap·stride - 1 on sees exactly cap
    return stride * cap * (cap - 1) // 2 + cap * (seq_len - cap * stride + 1)


class AttentionBase(nn.Module, HFNamed, abc.ABC):
    """Causal self-attention. API 2: ``forward(x_BTD, ctx) -> y_BTD``, the positions, document
    ids and cache read from ``ctx``. (API 1, deprecated: ``forward(x_BTD, positions_T,
    document_ids_BT, cache=None)``.) ``x_BTD`` is the normalised residual of the block.

    ``ctx.document_ids_BT`` (optional) marks packed documents; a token must never attend to a
    token of another document when it is given.

    Incremental decoding (optional): a plugin that supports it overrides ``new_cache``. With a
    cache (``ctx.cache``, ``ctx.decoding``), the T new tokens are at positions ``cache.length ...``
    (``ctx.positions_T`` holds exactly those); the plugin stores what it needs of them, attends from
    them to every cached token and to the earlier new tokens, and advances the cache
    (``AttentionCache.reserve``). Without a cache, ``forward`` is the training path.
    """

    Options: ClassVar[type[PluginOptions]] = PluginOptions

    def __init__(self, config: ModelConfig, options: PluginOptions, layer_id: int) -> None:
        super().__init__()

    @abc.abstractmethod
    def forward(self, x_BTD: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """Attend causally over T (and over the cached tokens); return the output projected to D."""

    def new_cache(self, batch_size: int, max_len: int, device: torch.device, dtype: torch.dtype) -> AttentionCache:
        """An empty cache for ``batch_size`` sequences of up to ``max_len`` tokens."""
        raise NotImplementedError(
            f"attention plugin {type(self).__module__}.{type(self).__qualname__} has no KV cache: "
            "implement new_cache() and accept forward(..., cache=...) to support incremental decoding"
        )

    @classmethod
    def kv_cache_values_per_token(cls, config: ModelConfig, options: PluginOptions) -> int:
        """Values one layer's cache stores per token (multiply by the element size for bytes)."""
        raise NotImplementedError(f"attention plugin {cls.__qualname__} does not report its cache size")

    @classmethod
    def attention_flops_per_token(cls, config: ModelConfig, options: PluginOptions, seq_len: int) -> float | None:
        """Forward FLOPs (2 per multiply-add) of one layer's score and value products per token,
        averaged over the positions of one causal sequence of ``seq_len`` tokens: the part of the
        cost that grows with the context (the projections are matrix parameters, counted apart).
        Include an indexer's scoring; ``causal_pair_count`` counts what a query sees. Training adds
        the backward (``attention_backward_flops_per_token``, by default twice this, as for the
        matrix products). Default None: the core's full-causal count, ``2·H·(d_qk + d_v)·T/2``,
        read off the module's ``n_heads`` and ``qk_head_dim``/``v_head_dim`` (or ``head_dim``)."""
        return None

    @classmethod
    def attention_backward_flops_per_token(
        cls, config: ModelConfig, options: PluginOptions, seq_len: int
    ) -> float | None:
        """The backward FLOPs of what ``attention_flops_per_token`` counts, where they are not twice
        the forward: a part computed without gradient (an indexer that scores every token but
        learns from its top-k only, a discrete selection) has no backward. Default None: twice the
        forward."""
        return None

    def take_training_losses(self) -> dict[str, torch.Tensor]:
        """Loss terms the last forward computed for training, by name, each already weighted (e.g.
        DSA's ``indexer_kl``); the decoder calls this after every forward of the block, adds them to
        the training loss and reports each name apart (``DecoderOutput.named_losses``, logged as
        ``train/<name>``). A plugin returns them once and forgets them. Default: none."""
        return {}

    def set_selective_recompute(self, enabled: bool) -> None:
        """Selective activation checkpointing (``runtime.activation_checkpointing: selective``) turns
        this on: recompute in backward what is cheap to redo and wide to keep (MLA: the query and
        key/value up-projections). The default keeps every activation, which is always correct."""
        fix = "override AttentionBase.set_selective_recompute() instead"
        if _api1_attribute(self, "recompute_up_projections", fix):
            self.recompute_up_projections = enabled


@dataclass
class RouterOutput:
    """What a router decides for a flat batch of N=T tokens choosing K experts each.

    ``weights_TK`` multiply the expert outputs (fp32), ``indices_TK`` name the experts,
    ``aux_loss`` is an optional scalar balance loss already scaled by its coefficient and
    ``tokens_per_expert_E`` counts routed tokens (used for balancing and metrics).
    """

    weights_TK: torch.Tensor
    indices_TK: torch.Tensor
    tokens_per_expert_E: torch.Tensor
    aux_loss: torch.Tensor | None = None


class RouterBase(nn.Module, HFNamed, abc.ABC):
    """Token-to-expert routing. API 2: ``__init__(config, options, layer_id)``,
    ``forward(x_TD, ctx) -> RouterOutput``. (API 1, deprecated: ``__init__(config, options)``,
    ``forward(x_TD)`` or, with ``takes_seq_len``, ``forward(x_TD, seq_len)``.)

    ``x_TD`` is the normalised residual of the block (the FFN's input), flattened: B·T rows,
    sequence after sequence, so ``ctx.token_ids_BT.flatten()`` names the token of each row and
    ``ctx.seq_len`` regroups rows into sequences.

    A router's parameters and buffers are high precision (fp32): low-precision plugins must leave
    them alone (see ``Decoder.high_precision_modules``).
    """

    Options: ClassVar[type[PluginOptions]] = PluginOptions
    # API 1 only: a router that needs the sequence structure of its flat input sets this and takes
    # ``forward(x_TD, seq_len)``. API-2 routers read ``ctx.seq_len`` instead.
    takes_seq_len: ClassVar[bool] = False

    def __init__(self, config: ModelConfig, options: PluginOptions, layer_id: int | None = None) -> None:
        super().__init__()

    @abc.abstractmethod
    def forward(self, x_TD: torch.Tensor, ctx: ForwardContext) -> RouterOutput:
        """Choose K experts and their gate weights for every token."""

    def update_after_step(self, tokens_per_expert_E: torch.Tensor) -> None:
        """Called once after every optimizer step with this layer's routed-token counts over the
        whole global batch (all micro-batches, all ranks). Routers trained only by gradients
        ignore it; a bias-balanced router (DeepSeek-V3's aux-loss-free rule) updates here."""

    def balance_state(self) -> dict[str, torch.Tensor]:
        """Named tensors of the router's balancing state, logged by the ``ExpertBalance`` callback as
        ``balance/<name>_min`` and ``_max`` per layer (the aux-free router: its ``bias``). A router
        balanced by gradients only has none."""
        return {}


# (projection name, expert-sorted rows x_NI, stacked weight w_EOI, row ends offs_E) -> y_NO
GroupedGemm = Callable[[str, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
# told a phase name ("moe_dispatch", "moe_experts") or None (phase over)
PhaseTimer = Callable[[str | None], None]


class ExpertsBase(nn.Module, HFNamed, abc.ABC):
    """The routed experts of one MoE layer. API 2: ``__init__(config, options, num_experts, dim,
    hidden_dim, layer_id)``, ``forward(x_TD, weights_TK, indices_TK, ctx) -> y_TD``. (API 1,
    deprecated: the same without ``layer_id`` and ``ctx``.)

    ``y_t = Σ_k weights[t,k] · expert_{indices[t,k]}(x_t)``; every token is processed (dropless).
    """

    Options: ClassVar[type[PluginOptions]] = PluginOptions

    def __init__(
        self,
        config: ModelConfig,
        options: PluginOptions,
        num_experts: int,
        dim: int,
        hidden_dim: int,
        layer_id: int | None = None,
    ) -> None:
        super().__init__()

    @abc.abstractmethod
    def forward(
        self, x_TD: torch.Tensor, weights_TK: torch.Tensor, indices_TK: torch.Tensor, ctx: ForwardContext
    ) -> torch.Tensor:
        """Combine the chosen experts' outputs, weighted, per token."""

    # -- declared hooks (plugin API 2) -------------------------------------------------------------
    # The grouped-GEMM seam: a plugin that computes its three projections over expert-sorted rows
    # sets ``grouped_gemm_seam = True`` and calls ``self.grouped_gemm(name, x_NI, w_EOI, offs_E)``
    # for each when it is not None; a precision plugin (fp8) installs its GEMM with
    # ``set_grouped_gemm``. The weights stay this module's Parameters.
    grouped_gemm_seam: ClassVar[bool] = False
    grouped_gemm: GroupedGemm | None = None
    # Phase marks: a plugin that calls ``self.mark_phase`` at its dispatch/compute boundaries sets
    # ``marks_phases = True``; the throughput breakdown then times its phases instead of the whole.
    marks_phases: ClassVar[bool] = False
    phase_timer: PhaseTimer | None = None

    @classmethod
    def shared_ffn(cls, config: ModelConfig, options: PluginOptions, dim: int, hidden_dim: int) -> nn.Module | None:
        """The shared experts' FFN of a MoE layer that uses these routed experts (``[.., dim] ->
        [.., dim]``, width ``hidden_dim`` = n_shared · F), or None for the core's SwiGLU. Why a hook:
        an experts plugin whose expert function differs (DeepSeek-V4 clamps the SwiGLU) must be able
        to give the shared experts the same function; they live outside the plugin, in the MoE layer."""
        return None

    def has_grouped_gemm_seam(self) -> bool:
        """Whether a precision plugin may take over this module's projections."""
        return type(self).grouped_gemm_seam or _api1_attribute(
            self, "grouped_gemm", "declare the seam with the class attribute grouped_gemm_seam = True instead"
        )

    def set_grouped_gemm(self, gemm: GroupedGemm | None) -> None:
        """Run the projections through ``gemm`` (None: this module's own GEMMs)."""
        if not self.has_grouped_gemm_seam():
            cls = f"{type(self).__module__}.{type(self).__qualname__}"
            raise TypeError(
                f"experts plugin {cls} has no grouped-GEMM seam: set grouped_gemm_seam = True "
                "and run its projections through self.grouped_gemm when it is set"
            )
        self.grouped_gemm = gemm

    def set_phase_timer(self, timer: PhaseTimer | None) -> None:
        """Install (None: remove) the callback ``mark_phase`` reports to; only for one measured step."""
        self.phase_timer = timer

    def mark_phase(self, name: str | None) -> None:
        """Tell the phase timer, if any, that the forward enters ``"moe_dispatch"`` (sort, gather,
        combine), ``"moe_experts"`` (the expert GEMMs) or leaves its phases (None)."""
        if self.phase_timer is not None:
            self.phase_timer(name)

    def set_selective_recompute(self, enabled: bool) -> None:
        """Selective activation checkpointing turns this on: keep only the gathered expert input
        for backward and recompute the wide hidden activations there. The default keeps all."""
        if _api1_attribute(self, "recompute", "override ExpertsBase.set_selective_recompute() instead"):
            self.recompute = enabled


class NormBase(nn.Module, HFNamed, abc.ABC):
    """A normalisation layer over the last dimension. API 2: ``__init__(dim, eps, options,
    layer_id=None)``, ``forward(x, ctx=None) -> x``. ``layer_id`` (and ``ctx.layer_id``) is None for
    norms outside the blocks (the final norm, MTP's input and output norms); ``ctx`` is None where a
    plugin uses a norm inside itself.
    (API 1, deprecated: ``__init__(dim, eps, options)``, ``forward(x)``.)"""

    Options: ClassVar[type[PluginOptions]] = PluginOptions

    def __init__(self, dim: int, eps: float, options: PluginOptions, layer_id: int | None = None) -> None:
        super().__init__()


# a block's sublayer as the residual sees it: its normalised computation, input -> output [.., D]
Sublayer = Callable[[torch.Tensor], torch.Tensor]
# An MTP module's input projection ``eh_proj([enorm(emb); hnorm(hidden)])`` over any leading shape:
# (embeddings of the tokens ahead [..., D], hidden state [..., D]) -> [..., D]
MTPCombine = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class ResidualBase(nn.Module, HFNamed, abc.ABC):
    """The residual stream of one block: how the block's two sublayers connect.

    ``forward(h, attention, ffn, ctx) -> h``: ``attention`` and ``ffn`` are callables taking a
    [B, T, D] input and returning [B, T, D]; each normalises its input itself (``attn(attn_norm(.))``,
    ``ffn(ffn_norm(.))``). ``h`` is whatever the plugin carries between blocks: [B, T, D] for one
    stream (the default ``prenorm``: ``h = h + attention(h); h + ffn(h)``), e.g. [B, T, n, D] for
    n streams (hyper-connections). ``expand`` turns the embedding into that state before the first
    block and ``reduce`` turns it back into [B, T, D] after the last one (the decoder calls them on
    the first and the last block's residual, so learned reduction weights belong to the last
    layer, ``layer_id == config.n_layers - 1``; each MTP block expands and reduces its own).
    Everything must be per token (no mixing along T), so that decoding with a cache equals the
    full forward.

    Multi-token prediction (MTP) asks the residual twice, so a multi-stream residual can run MTP in
    its own stream form: ``mtp_carry`` (on the last main block's residual, then on each MTP block's)
    says what the next MTP depth receives, ``mtp_input`` (on the MTP block's residual) turns that
    and the next tokens' embeddings into the state the MTP block starts from. The defaults are
    DeepSeek-V3's MTP: the reduced hidden state goes on, ``eh_proj`` mixes it with the embedding
    and ``expand`` makes the block's state of it.
    """

    Options: ClassVar[type[PluginOptions]] = PluginOptions

    def __init__(self, config: ModelConfig, options: PluginOptions, layer_id: int) -> None:
        super().__init__()

    def expand(self, x_BTD: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """The residual state the first block receives, from the embedding (default: itself)."""
        return x_BTD

    def reduce(self, h: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """The [B, T, D] hidden state the final norm and head receive (default: itself)."""
        return h

    def mtp_carry(self, h: torch.Tensor, x_BTD: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """What the next MTP depth receives from this block's output state ``h`` (``x_BTD`` is
        ``reduce(h)``); default: ``x_BTD``, the reduced hidden state."""
        return x_BTD

    def mtp_input(
        self, carry: torch.Tensor, emb_BTD: torch.Tensor, combine: MTPCombine, ctx: ForwardContext
    ) -> torch.Tensor:
        """The state this MTP block starts from: ``carry`` is the previous block's ``mtp_carry``
        (cut to the positions that have a token ahead), ``emb_BTD`` the embeddings of the tokens
        ahead, ``combine`` the MTP module's projection. Default: ``expand(combine(emb, carry))``."""
        return self.expand(combine(emb_BTD, carry), ctx)

    @abc.abstractmethod
    def forward(self, h: torch.Tensor, attention: Sublayer, ffn: Sublayer, ctx: ForwardContext) -> torch.Tensor:
        """Run the block's sublayers on the residual state; return the next state."""


def default_init(module: nn.Module, std: float) -> None:
    """Default initialisation of a module's own parameters (not its children's).

    N(0, std) for matrices, ones for 1-D scales (norms), zeros for biases. The decoder applies it
    to every module after materialising from the meta device, unless the module defines
    ``init_weights(std)`` itself (a plugin with buffers, such as a router bias, does).
    """
    for name, p in module.named_parameters(recurse=False):
        with torch.no_grad():
            if p.dim() >= 2:
                nn.init.normal_(p, mean=0.0, std=std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)
            else:
                nn.init.ones_(p)
