"""The DeepSeek-V3.2 checkpoint family, registered as ``moeframe.hf_family`` ``deepseek_v32``.

A V3.2 folder is a V3 folder plus each layer's indexer (``self_attn.indexer.{wq_b, wk, k_norm,
weights_proj}``) and three config fields (``index_n_heads``, ``index_head_dim``, ``index_topk``);
its config has no ``rope_interleave`` (MLA's rope is interleaved, the indexer's rotate-half, always).
So the family is DeepSeek-V3's (``moeframe_mla.hf_family``) with attention ``dsa`` in every layer;
the tensors' names come from the attention plugin, the FP8 block format from the core converter
exactly as for V3 (the indexer's projections are quantisable 2-D weights like MLA's).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from moeframe.plugin import ConfigError, ModelConfig, registry, resolve_model_config
from moeframe_dsa.attention import V32_FAMILY
from moeframe_mla.hf_family import DeepSeekFamily

__all__ = ["DeepSeekV32Family"]


class DeepSeekV32Family(DeepSeekFamily):
    """HF ``deepseek_v32`` folders (transformers' DeepseekV32ForCausalLM)."""

    display_name = "DeepSeek-V3.2"
    model_type = V32_FAMILY

    def config_from_hf(self, hf: dict[str, Any], path: str, mtp: bool) -> ModelConfig:
        if hf.get("model_type") != V32_FAMILY:
            raise ConfigError(f"{path}: model_type {hf.get('model_type')!r} is not a DeepSeek-V3.2 checkpoint")
        config = super().config_from_hf({**hf, "model_type": "deepseek_v3"}, path, mtp)
        try:
            attention = {"name": "dsa", **registry.load("attention", "dsa").options_from_hf(self.name, hf)}
        except KeyError as exc:
            raise ConfigError(f"{path}: missing field {exc.args[0]!r} for a DeepSeek-V3.2 checkpoint") from None
        return dataclasses.replace(config, attention=attention)

    def config_to_hf(self, config: ModelConfig, mtp: bool) -> dict[str, Any]:
        plan = resolve_model_config(config)
        if plan.attention.name != "dsa":
            raise ConfigError(
                f"HF DeepSeek-V3.2 checkpoints need attention dsa in every layer; the model uses "
                f"{plan.attention.name!r} (export it as deepseek_v3 instead)"
            )
        out = super().config_to_hf(config, mtp)
        return {**out, "architectures": ["DeepseekV32ForCausalLM"], "model_type": self.model_type}
