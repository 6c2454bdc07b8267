"""The DeepSeek-V3/V2 checkpoint family, registered as ``moeframe.hf_family`` ``deepseek_v3`` and
``deepseek_v2`` (the HF ``model_type`` values it reads).

It knows DeepSeek's HF module tree and model-wide fields; each part names its own tensors and
options (``hf_tensor_names`` / ``hf_config`` / ``options_from_hf`` on the plugin classes). What
the family decides:
- the parts of an imported model: MLA attention (every DeepSeek-V2/V3 checkpoint), the router by
  ``scoring_func`` (V3's sigmoid + correction bias is ``aux_free``, V2's softmax is ``topk``);
- where parts sit: block ``i`` is ``model.layers.i`` (``input_layernorm``, ``self_attn``,
  ``post_attention_layernorm``, ``mlp`` with ``gate``, ``experts``, ``shared_experts``);
- multi-token prediction: depth k is HF layer ``n_layers + k - 1`` (layer 61 in DeepSeek-V3),
  its own ``enorm``/``hnorm``/``eh_proj``/``shared_head.norm`` then a full block under the usual
  per-layer names; released checkpoints also store a copy of the embedding and the head in
  every MTP layer, which export writes and import skips (moeframe shares the main model's);
- what stays BF16 in an FP8 export, as in the release (safetensors headers of DeepSeek-V3): the
  embedding, the head and its MTP copy, and the MTP projection ``eh_proj``; routers (fp32) and
  1-D tensors never quantise anyway.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from moeframe.plugin import ConfigError, HFFamily, HFTensor, ModelConfig, registry, resolve_model_config
from moeframe_mla.rope import hf_rope_parameters

if TYPE_CHECKING:
    import torch

__all__ = ["DeepSeekFamily"]

_BLOCK_PARTS = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn": "self_attn",
    "ffn": "mlp",
}
_MTP_PARTS = {"enorm": "enorm", "hnorm": "hnorm", "eh_proj": "eh_proj", "norm": "shared_head.norm"}
_CORE_TENSORS = {"embed.weight": "model.embed_tokens.weight", "head.weight": "lm_head.weight"}
_MTP_COPIES = ("embed_tokens.weight", "shared_head.head.weight")


class DeepSeekFamily(HFFamily):
    """HF ``deepseek_v3`` / ``deepseek_v2`` folders (transformers' DeepseekV3/V2ForCausalLM)."""

    display_name = "DeepSeek-V3/V2"
    model_type = "deepseek_v3"

    # -- config -----------------------------------------------------------------------------------
    def _router(self, hf: dict[str, Any], model_type: str) -> dict[str, Any]:
        sigmoid = hf.get("scoring_func", "sigmoid" if model_type == "deepseek_v3" else "softmax") == "sigmoid"
        name = "aux_free" if sigmoid else "topk"
        return {"name": name, **registry.load("router", name).options_from_hf(self.name, hf)}

    def config_from_hf(self, hf: dict[str, Any], path: str, mtp: bool) -> ModelConfig:
        model_type = hf.get("model_type")
        if model_type not in ("deepseek_v3", "deepseek_v2"):
            raise ConfigError(f"{path}: model_type {model_type!r} is not a DeepSeek-V3/V2 checkpoint")
        try:
            theta, _ = hf_rope_parameters(hf)
            attention = {"name": "mla", **registry.load("attention", "mla").options_from_hf(self.name, hf)}
            return ModelConfig(
                vocab_size=hf["vocab_size"],
                dim=hf["hidden_size"],
                n_layers=hf["num_hidden_layers"],
                first_k_dense=hf.get("first_k_dense_replace", 0),
                n_heads=hf["num_attention_heads"],
                dense_ffn_dim=hf["intermediate_size"],
                moe_ffn_dim=hf["moe_intermediate_size"],
                n_routed_experts=hf["n_routed_experts"],
                n_activated_experts=hf["num_experts_per_tok"],
                n_shared_experts=hf.get("n_shared_experts") or 0,
                n_expert_groups=hf.get("n_group") or 1,
                n_limited_groups=hf.get("topk_group") or 1,
                route_scale=float(hf.get("routed_scaling_factor", 1.0)),
                mtp_depth=int(hf.get("num_nextn_predict_layers") or 0) if mtp else 0,
                norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                init_std=float(hf.get("initializer_range", 0.006)),
                max_seq_len=hf.get("max_position_embeddings", 4096),
                rope_theta=theta,
                tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
                attention=attention,
                router=self._router(hf, model_type),
            )
        except KeyError as exc:
            raise ConfigError(f"{path}: missing field {exc.args[0]!r} for a DeepSeek checkpoint") from None

    def config_to_hf(self, config: ModelConfig, mtp: bool) -> dict[str, Any]:
        plan = resolve_model_config(config)
        parts = {kind: getattr(plan, kind) for kind in ("attention", "router", "experts", "norm")}
        fields = {kind: p.cls.hf_config(self.name, config, p.options) for kind, p in parts.items()}
        # what makes a model DeepSeek-shaped, asked of the parts rather than of their names
        if "kv_lora_rank" not in fields["attention"]:
            raise ConfigError(
                f"HF DeepSeek checkpoints need MLA-shaped attention (its HF fields kv_lora_rank, "
                f"qk_rope_head_dim, ...); attention plugin {parts['attention'].name!r} declares "
                f"{sorted(fields['attention']) or 'no HF config fields'}"
            )
        if "scoring_func" not in fields["router"]:
            raise ConfigError(
                f"HF DeepSeek checkpoints need a router that declares its scoring_func; router "
                f"plugin {parts['router'].name!r} declares {sorted(fields['router']) or 'no HF config fields'}"
            )
        out = {
            "architectures": ["DeepseekV3ForCausalLM"],
            "model_type": self.model_type,
            "vocab_size": config.vocab_size,
            "hidden_size": config.dim,
            "intermediate_size": config.dense_ffn_dim,
            "moe_intermediate_size": config.moe_ffn_dim,
            "num_hidden_layers": config.n_layers,
            "num_attention_heads": config.n_heads,
            "n_shared_experts": config.n_shared_experts,
            "n_routed_experts": config.n_routed_experts,
            "routed_scaling_factor": config.route_scale,
            "n_group": config.n_expert_groups,
            "topk_group": config.n_limited_groups,
            "num_experts_per_tok": config.n_activated_experts,
            "first_k_dense_replace": config.first_k_dense,
            "hidden_act": "silu",
            "max_position_embeddings": config.max_seq_len,
            "initializer_range": config.init_std,
            "rms_norm_eps": config.norm_eps,
            "tie_word_embeddings": config.tie_embeddings,
            "num_nextn_predict_layers": config.mtp_depth if mtp else 0,
            "dtype": "bfloat16",
        }
        for kind in ("attention", "router", "experts", "norm"):
            out.update(fields[kind])
        return out

    # -- tensor names -----------------------------------------------------------------------------
    def module_prefix(self, module: str, config: ModelConfig) -> str | None:
        if module == "norm":
            return "model.norm"
        mtp = re.fullmatch(r"mtp\.(\d+)\.(.+)", module)
        if mtp is not None:
            layer, rest = config.n_layers + int(mtp.group(1)), mtp.group(2)
            if rest.startswith("block."):
                return self.module_prefix(f"layers.{layer}.{rest[len('block.') :]}", config)
            return f"model.layers.{layer}.{_MTP_PARTS[rest]}" if rest in _MTP_PARTS else None
        block = re.fullmatch(r"layers\.(\d+)\.([a-z_]+)(\..+)?", module)
        if block is None or block.group(2) not in _BLOCK_PARTS:
            return None
        return f"model.layers.{block.group(1)}.{_BLOCK_PARTS[block.group(2)]}{block.group(3) or ''}"

    def core_tensor(self, key: str, config: ModelConfig) -> HFTensor | None:
        if key in _CORE_TENSORS:  # released FP8 checkpoints keep the embedding and head in BF16
            return HFTensor(_CORE_TENSORS[key], quantizable=False)
        module, _, leaf = key.rpartition(".")
        prefix = self.module_prefix(module, config) if module.startswith("mtp.") else None
        # the MTP projection eh_proj is BF16 in the released FP8 checkpoint (only its block is FP8)
        return None if prefix is None else HFTensor(f"{prefix}.{leaf}", quantizable=False)

    def exported_copies(
        self, state: dict[str, torch.Tensor], config: ModelConfig, mtp: bool
    ) -> Iterator[tuple[HFTensor, torch.Tensor]]:
        for k in range(config.mtp_depth if mtp else 0):
            layer = f"model.layers.{config.n_layers + k}"
            # separate storage: safetensors refuses tensors that share memory
            yield HFTensor(f"{layer}.embed_tokens.weight", quantizable=False), state["embed.weight"].clone()
            yield HFTensor(f"{layer}.shared_head.head.weight", quantizable=False), state["head.weight"].clone()

    def skipped_on_import(self, hf_key: str, config: ModelConfig) -> bool:
        """MTP layers beyond the loaded depth, and the MTP layers' copies of the shared weights."""
        m = re.match(r"model\.layers\.(\d+)\.(.+)", hf_key)
        if m is None or int(m.group(1)) < config.n_layers:
            return False
        return int(m.group(1)) >= config.n_layers + config.mtp_depth or m.group(2) in _MTP_COPIES
