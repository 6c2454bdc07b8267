"""HF checkpoint family ``template_name``: folders whose config.json says ``model_type: template_name`` (a starting point).

A family knows the HF module tree and the model-wide config fields; every part (attention,
router, experts, norm) names its own tensors and options (``hf_tensor_names``, ``hf_config``,
``options_from_hf`` on its class). This one lays a moeframe decoder out in the Llama/DeepSeek
tree (``model.layers.i.self_attn``, ``.mlp.experts.e``, ...) and records which plugin each part
is, so any parts that declare their names convert. Adapt ``config_*`` to a real family's fields.
"""

from __future__ import annotations

import re
from dataclasses import fields
from typing import Any

from moeframe.plugin import ConfigError, HFFamily, HFTensor, ModelConfig, registry, resolve_model_config

_PARTS = ("attention", "router", "experts", "norm")
_BLOCK = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn": "self_attn", "ffn": "mlp"}
_CORE = {"embed.weight": "model.embed_tokens.weight", "head.weight": "lm_head.weight"}


class TemplateNameFamily(HFFamily):
    display_name = "template_name"
    model_type = "template_name"
    plugin_api = "2"  # the moeframe plugin API this class is written against

    def config_from_hf(self, hf: dict[str, Any], path: str, mtp: bool) -> ModelConfig:
        try:
            core = {f.name: hf["moeframe"][f.name] for f in fields(ModelConfig) if f.name not in _PARTS}
            parts = {
                kind: {
                    "name": hf[f"{kind}_type"],
                    **registry.load(kind, hf[f"{kind}_type"]).options_from_hf(self.name, hf),
                }
                for kind in _PARTS
            }
        except KeyError as exc:
            raise ConfigError(f"{path}: missing field {exc.args[0]!r} for a template_name checkpoint") from None
        return ModelConfig(**core, **parts)

    def config_to_hf(self, config: ModelConfig, mtp: bool) -> dict[str, Any]:
        if config.mtp_depth and mtp:
            raise ConfigError("template_name checkpoints have no multi-token-prediction layers; export with mtp=False")
        plan = resolve_model_config(config)
        out: dict[str, Any] = {
            "model_type": self.model_type,
            "moeframe": {f.name: getattr(config, f.name) for f in fields(ModelConfig) if f.name not in _PARTS},
        }
        for kind in _PARTS:
            choice = getattr(plan, kind)
            out[f"{kind}_type"] = choice.name
            out.update(choice.cls.hf_config(self.name, config, choice.options))
        return out

    def module_prefix(self, module: str, config: ModelConfig) -> str | None:
        if module == "norm":
            return "model.norm"
        m = re.fullmatch(r"layers\.(\d+)\.([a-z_]+)(\..+)?", module)
        if m is None or m.group(2) not in _BLOCK:
            return None
        return f"model.layers.{m.group(1)}.{_BLOCK[m.group(2)]}{m.group(3) or ''}"

    def core_tensor(self, key: str, config: ModelConfig) -> HFTensor | None:
        return HFTensor(_CORE[key], quantizable=False) if key in _CORE else None
