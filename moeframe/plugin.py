"""The public surface for plugin authors: everything a moeframe plugin may import, in one module.

A plugin (first-party or third-party) imports from ``moeframe.plugin`` and from nowhere else in
moeframe; a test scans the first-party plugins and ``examples/`` and fails on any other
``moeframe.*`` import. What is here is covered by the plugin API version: a change that breaks a
plugin using only these names bumps ``PLUGIN_API_VERSION``. Everything else in moeframe may move
between releases without notice. The old import paths of plugin API 1 (``moeframe.model.base``,
``moeframe.model.attention.document_mask``, ...) keep working for this release.

What is here, by use:

- the **base classes** of each model-part kind and their typed options: ``AttentionBase``
  (+ ``AttentionCache``), ``RouterBase`` (+ ``RouterOutput``), ``ExpertsBase``, ``NormBase``,
  ``PluginOptions`` and ``parse_options`` (for options nested in options), ``ModelConfig`` (what
  every constructor receives);
- the **forward context** every model-part plugin's ``forward`` receives (``ForwardContext``: layer
  index, token ids, positions, document ids, the cache while decoding, step and tokens seen), and
  ``as_context`` for an API-2 ``forward`` that API-1 subclasses still call the old way; the
  residual-stream base ``ResidualBase`` (and ``Sublayer``, what it is handed; ``MTPCombine``,
  the MTP module's projection its MTP hooks ``mtp_carry``/``mtp_input`` are handed);
- the **declared hooks** on those bases (no attribute probing): ``set_selective_recompute``
  (attention, experts; recompute through ``activation_checkpoint``, so that counted and timed
  forwards can tell the recompute in backward apart: ``is_recomputing``), the grouped-GEMM seam of experts (``grouped_gemm_seam``,
  ``set_grouped_gemm``, the ``GroupedGemm`` signature), the phase timer of experts
  (``marks_phases``, ``mark_phase``, ``set_phase_timer``, ``PhaseTimer``), the router's
  ``balance_state`` and ``update_after_step``;
- **helpers** plugins legitimately need: attention masks (``document_mask``,
  ``cached_causal_mask``), attention cost counting (``causal_pair_count``), routing (``gate_logits_fp32``, ``count_per_expert``,
  ``limit_to_groups``), MoE-layer discovery (``moe_layers``), the grouped GEMM (``grouped_mm``: traces in
  float32 under ``torch.compile`` too), its capability test (``grouped_mm_supported``) and the
  static-size expert-group padding (``pad_expert_groups_static``), weight init (``default_init``, ``init_random_stream``), the FP8 block format (``quantize_blocks`` and its
  constants), parallel-layout checks (``check_ep_layout``, ``check_zero_layout``), atomic
  checkpoint IO (``partial_name``, ``replace_folder``, ``remove_stale_partials``), the parameters
  DDP must leave alone (``ddp_ignore``), buffers that stay fp32 when the module is cast
  (``KeepsFP32Buffers``, a mixin naming them in ``fp32_buffers``), ``ConfigError``;
- **names and layouts a plugin declares**: ``HFNamed`` (a part's HF tensor names and config
  fields; ``EXPERT`` stands for the expert index), ``HFFamily``/``HFTensor`` (a checkpoint-family
  adapter, entry-point kind ``hf_family``), ``DescribesLayout``/``ParallelLayout`` (a strategy's
  parallel layout), ``DescribesMemory``/``TrainingBytes`` (a precision's bytes per parameter);
- the core's **baseline plugins**, to extend or reuse: ``MultiHeadAttention``/``MHAOptions``
  (with ``KVCache``, ``rope_cos_sin``, ``apply_rope``), ``RMSNorm``, ``GroupedExperts``;
- for a plugin's own tests: ``registry`` (``registry.load(kind, name)`` is what a run does),
  ``resolve_model_config`` (validate a config, get the parsed options) and ``build_decoder``; the
  contract checks are in ``moeframe.testing``;
- for strategies that run the decoder in parts (pipeline stages): ``DecoderOutput`` (what a
  decoder forward returns, and what ``PretrainModule.training_loss`` takes); the parts themselves
  are methods of the decoder (``context``, ``begin``, ``run_layers``, ``finish``).
"""

from __future__ import annotations

import importlib
from typing import Any

from moeframe import registry
from moeframe.compat import KeepsFP32Buffers, ddp_ignore
from moeframe.config import ModelConfig, resolve_model_config
from moeframe.convert.family import HFFamily, HFTensor
from moeframe.convert.fp8 import AMAX_FLOOR, BLOCK, E4M3_MAX, dequantize_blocks, quantize_blocks
from moeframe.errors import ConfigError
from moeframe.layout import (
    DescribesLayout,
    DescribesMemory,
    ParallelLayout,
    TrainingBytes,
    check_ep_layout,
    check_zero_layout,
)
from moeframe.model.attention import KVCache, MHAOptions, MultiHeadAttention, cached_causal_mask, document_mask
from moeframe.model.base import (
    AttentionBase,
    AttentionCache,
    ExpertsBase,
    GroupedGemm,
    MTPCombine,
    NormBase,
    PhaseTimer,
    PluginDeprecationWarning,
    PluginOptions,
    ResidualBase,
    RouterBase,
    RouterOutput,
    Sublayer,
    causal_pair_count,
    default_init,
    describe_type,
    options_as_config,
    parse_options,
)
from moeframe.model.compat import as_context
from moeframe.model.context import ForwardContext
from moeframe.model.decoder import DecoderOutput, build_decoder, init_random_stream
from moeframe.model.experts import GroupedExperts, grouped_mm, grouped_mm_supported, pad_expert_groups_static
from moeframe.model.hfnames import EXPERT, HFNamed
from moeframe.model.moe import moe_layers
from moeframe.model.norm import RMSNorm
from moeframe.model.recompute import activation_checkpoint, is_recomputing
from moeframe.model.rope import apply_rope, rope_cos_sin
from moeframe.model.router import count_per_expert, gate_logits_fp32, limit_to_groups
from moeframe.registry import PLUGIN_API

# The plugin API this moeframe provides; a plugin declares the one it targets as ``plugin_api``.
PLUGIN_API_VERSION: int = int(PLUGIN_API)

# Checkpoint IO lives in the training layer, which imports Lightning (seconds): loaded on first
# use, so that importing a model-part plugin (``moeframe inspect``) stays fast.
_LAZY: dict[str, str] = {
    "partial_name": "moeframe.training.checkpoint_io",
    "replace_folder": "moeframe.training.checkpoint_io",
    "remove_stale_partials": "moeframe.training.checkpoint_io",
}

__all__ = [
    "AMAX_FLOOR",
    "BLOCK",
    "E4M3_MAX",
    "EXPERT",
    "PLUGIN_API_VERSION",
    "ForwardContext",
    "ResidualBase",
    "MTPCombine",
    "Sublayer",
    "as_context",
    "DescribesLayout",
    "DescribesMemory",
    "HFFamily",
    "HFNamed",
    "HFTensor",
    "ParallelLayout",
    "TrainingBytes",
    "AttentionBase",
    "AttentionCache",
    "ConfigError",
    "DecoderOutput",
    "ExpertsBase",
    "GroupedExperts",
    "GroupedGemm",
    "KVCache",
    "MHAOptions",
    "ModelConfig",
    "MultiHeadAttention",
    "NormBase",
    "PhaseTimer",
    "PluginDeprecationWarning",
    "PluginOptions",
    "RMSNorm",
    "RouterBase",
    "RouterOutput",
    "apply_rope",
    "build_decoder",
    "registry",
    "resolve_model_config",
    "rope_cos_sin",
    "cached_causal_mask",
    "causal_pair_count",
    "check_ep_layout",
    "check_zero_layout",
    "count_per_expert",
    "default_init",
    "dequantize_blocks",
    "describe_type",
    "document_mask",
    "gate_logits_fp32",
    "grouped_mm",
    "grouped_mm_supported",
    "init_random_stream",
    "pad_expert_groups_static",
    "limit_to_groups",
    "moe_layers",
    "activation_checkpoint",
    "is_recomputing",
    "options_as_config",
    "parse_options",
    "partial_name",
    "quantize_blocks",
    "remove_stale_partials",
    "replace_folder",
    "ddp_ignore",
    "KeepsFP32Buffers",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(
        f"module 'moeframe.plugin' has no attribute {name!r}; the plugin API offers: {', '.join(__all__)}"
    )


def __dir__() -> list[str]:
    return sorted(__all__)
