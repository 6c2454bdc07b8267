"""How the decoder builds and calls a plugin of either plugin API, in one place.

Plugin API 2 hands every model-part plugin the forward context (``moeframe.model.context``) and
the layer index at construction. Plugins written for API 1 keep working unchanged for this
release: the registry warns once per plugin (naming what to change, see ``api1_message``) and
the functions below call them with the API-1 signatures, which carry the same information minus
the context. Which form a plugin gets is decided by its declared ``plugin_api``, never by probing
its signature.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from moeframe.model.context import ForwardContext, uses_context
from moeframe.registry import API2_CHANGES, api1_message, declared_plugin_api  # noqa: F401 (re-exported)

if TYPE_CHECKING:
    from moeframe.config import ModelConfig, PluginChoice
    from moeframe.model.base import RouterOutput


def as_context(
    ctx_or_positions_T: Any, document_ids_BT: torch.Tensor | None = None, cache: Any = None
) -> ForwardContext:
    """The context an API-2 plugin's ``forward`` works with, also when an API-1 subclass calls it
    the old way (``super().forward(x_BTD, positions_T, document_ids_BT, cache)``)."""
    if isinstance(ctx_or_positions_T, ForwardContext):
        return ctx_or_positions_T
    return ForwardContext(ctx_or_positions_T, None, document_ids_BT, cache=cache)


# -- construction --------------------------------------------------------------------------------
def build_attention(choice: PluginChoice, config: ModelConfig, layer_id: int) -> torch.nn.Module:
    return choice.cls(config, choice.options, layer_id)  # same constructor in API 1 and 2


def build_router(choice: PluginChoice, config: ModelConfig, layer_id: int) -> torch.nn.Module:
    if uses_context_cls(choice.cls):
        return choice.cls(config, choice.options, layer_id)
    return choice.cls(config, choice.options)


def build_experts(choice: PluginChoice, config: ModelConfig, layer_id: int) -> torch.nn.Module:
    args = (config, choice.options, config.n_routed_experts, config.dim, config.moe_ffn_dim)
    return choice.cls(*args, layer_id) if uses_context_cls(choice.cls) else choice.cls(*args)


def build_norm(choice: PluginChoice, config: ModelConfig, layer_id: int | None) -> torch.nn.Module:
    if uses_context_cls(choice.cls):
        return choice.cls(config.dim, config.norm_eps, choice.options, layer_id)
    return choice.cls(config.dim, config.norm_eps, choice.options)


def uses_context_cls(cls: type) -> bool:
    return declared_plugin_api(cls) != "1"


# -- calls ---------------------------------------------------------------------------------------
def call_attention(attn: Any, x_BTD: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
    if uses_context(attn):
        return attn(x_BTD, ctx)
    # API 1: `cache` is passed only when used, so plugins without a cache keep working
    if ctx.cache is None:
        return attn(x_BTD, ctx.positions_T, ctx.document_ids_BT)
    return attn(x_BTD, ctx.positions_T, ctx.document_ids_BT, cache=ctx.cache)


def call_router(router: Any, x_TD: torch.Tensor, ctx: ForwardContext) -> RouterOutput:
    if uses_context(router):
        return router(x_TD, ctx)
    return router(x_TD, seq_len=ctx.seq_len) if getattr(router, "takes_seq_len", False) else router(x_TD)


def call_experts(
    experts: Any, x_TD: torch.Tensor, weights_TK: torch.Tensor, indices_TK: torch.Tensor, ctx: ForwardContext
) -> torch.Tensor:
    if uses_context(experts):
        return experts(x_TD, weights_TK, indices_TK, ctx)
    return experts(x_TD, weights_TK, indices_TK)


def call_norm(norm: Any, x: torch.Tensor, ctx: ForwardContext | None) -> torch.Tensor:
    return norm(x, ctx) if uses_context(norm) else norm(x)
