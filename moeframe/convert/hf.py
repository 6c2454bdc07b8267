"""HF DeepSeek-V3 (and V2-shape) checkpoints in and out of moeframe.

Import (``from_hf``): ``config.json`` becomes a ``ModelConfig`` (MLA attention, ``aux_free``
router for V3's sigmoid+bias routing, ``topk`` for V2's softmax routing); the safetensors shards
are then read one at a time, each tensor copied straight into the preallocated decoder (experts
into their slice of the stacked expert weights), so peak memory stays near the model plus one
shard. FP8 shards (``float8_e4m3fn`` + ``weight_scale_inv``) are dequantised on the way in.
Every expected tensor must be found exactly once; anything missing, unexpected or of the wrong
shape is an error naming the file and the key.

Export (``to_hf``): the inverse mapping, written as sharded safetensors with an index, a
``config.json`` transformers can load, and optionally the FP8 block format.

Names: moeframe follows the DeepSeek reference implementation (``wq_a``, ``wkv_b``, ``w1``…);
HF uses ``q_a_proj``, ``kv_b_proj``, ``gate_proj``…; the table below is the single source.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from dataclasses import fields
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from moeframe.config import ConfigError, ModelConfig
from moeframe.convert.fp8 import ScaleLookup, dequantize_blocks, quantize_blocks
from moeframe.model.decoder import Decoder, build_decoder

# (moeframe regex, HF template). Per-layer names; {i} is the layer index.
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn.wq.weight": "self_attn.q_proj.weight",
    "attn.wq_a.weight": "self_attn.q_a_proj.weight",
    "attn.q_norm.weight": "self_attn.q_a_layernorm.weight",
    "attn.wq_b.weight": "self_attn.q_b_proj.weight",
    "attn.wkv_a.weight": "self_attn.kv_a_proj_with_mqa.weight",
    "attn.kv_norm.weight": "self_attn.kv_a_layernorm.weight",
    "attn.wkv_b.weight": "self_attn.kv_b_proj.weight",
    "attn.wo.weight": "self_attn.o_proj.weight",
    "ffn.w1.weight": "mlp.gate_proj.weight",
    "ffn.w3.weight": "mlp.up_proj.weight",
    "ffn.w2.weight": "mlp.down_proj.weight",
    "ffn.gate.weight": "mlp.gate.weight",
    "ffn.gate.e_score_correction_bias": "mlp.gate.e_score_correction_bias",
    "ffn.shared_experts.w1.weight": "mlp.shared_experts.gate_proj.weight",
    "ffn.shared_experts.w3.weight": "mlp.shared_experts.up_proj.weight",
    "ffn.shared_experts.w2.weight": "mlp.shared_experts.down_proj.weight",
}
_EXPERT_NAMES = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
_GLOBAL_NAMES = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
                 "head.weight": "lm_head.weight"}
# moeframe-only state that HF checkpoints do not carry
_NOT_IN_HF = re.compile(r"(^|\.)(num_bias_updates|num_tokens_seen)$")
# HF modules kept in high precision in the released FP8 checkpoints. The MTP module's own
# projection ``eh_proj`` and its copy of the output head (``shared_head.head``) are BF16 there
# without a weight_scale_inv (safetensors headers of deepseek-ai/DeepSeek-V3); only its
# transformer block (attention, experts) is FP8.
_NEVER_FP8 = re.compile(r"(embed_tokens|lm_head|\.gate\.weight|layernorm|norm\.weight|e_score_correction_bias"
                        r"|\.eh_proj\.weight|shared_head\.head\.weight)")


_MTP_NAMES = {"enorm.weight": "enorm.weight", "hnorm.weight": "hnorm.weight", "eh_proj.weight": "eh_proj.weight",
              "norm.weight": "shared_head.norm.weight"}


def hf_names(name: str, tensor_shape: tuple[int, ...], n_layers: int) -> list[tuple[str, Optional[int]]]:
    """The HF key(s) of one moeframe tensor: [(hf_name, expert index or None)].

    MTP depth k is HF layer ``n_layers + k - 1`` (layer 61 in DeepSeek-V3): its own norms and
    projection, then a full block under the usual per-layer names."""
    if name in _GLOBAL_NAMES:
        return [(_GLOBAL_NAMES[name], None)]
    mtp = re.fullmatch(r"mtp\.(\d+)\.(.+)", name)
    if mtp is not None:
        layer, rest = n_layers + int(mtp.group(1)), mtp.group(2)
        if rest in _MTP_NAMES:
            return [(f"model.layers.{layer}.{_MTP_NAMES[rest]}", None)]
        if rest.startswith("block."):
            return hf_names(f"layers.{layer}.{rest[len('block.'):]}", tensor_shape, n_layers)
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", name)
    if m is None:
        raise ConfigError(f"no HF name for moeframe tensor {name!r}")
    i, rest = m.groups()
    e = re.fullmatch(r"ffn\.experts\.(w[123])", rest)
    if e is not None:
        proj = _EXPERT_NAMES[e.group(1)]
        return [(f"model.layers.{i}.mlp.experts.{k}.{proj}.weight", k) for k in range(tensor_shape[0])]
    if rest not in _LAYER_NAMES:
        raise ConfigError(f"moeframe tensor {name!r} has no HF DeepSeek equivalent (only MLA attention, "
                          "SwiGLU FFNs and DeepSeekMoE layers convert)")
    return [(f"model.layers.{i}.{_LAYER_NAMES[rest]}", None)]


# -- config ---------------------------------------------------------------------------------------
def _rope(hf: dict[str, Any]) -> tuple[float, Optional[dict[str, Any]]]:
    params = hf.get("rope_parameters") or {}
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    scaling = hf.get("rope_scaling") or (params if params.get("rope_type", "default") != "default" else None)
    return theta, scaling


def config_from_hf(hf: dict[str, Any], path: str = "config.json", mtp: bool = True) -> ModelConfig:
    """A ModelConfig (MLA + DeepSeek router) from an HF DeepSeek V3/V2 ``config.json`` dict;
    ``mtp=False`` leaves the multi-token-prediction layers out."""
    model_type = hf.get("model_type")
    if model_type not in ("deepseek_v3", "deepseek_v2"):
        raise ConfigError(f"{path}: model_type {model_type!r} is not a DeepSeek-V3/V2 checkpoint")
    try:
        theta, scaling = _rope(hf)
        attention: dict[str, Any] = {
            "name": "mla", "q_lora_rank": hf.get("q_lora_rank"), "kv_lora_rank": hf["kv_lora_rank"],
            "qk_nope_head_dim": hf["qk_nope_head_dim"], "qk_rope_head_dim": hf["qk_rope_head_dim"],
            "v_head_dim": hf["v_head_dim"], "rope_interleave": bool(hf.get("rope_interleave", True)),
        }
        if scaling and scaling.get("rope_type", scaling.get("type")) == "yarn":
            attention.update(rope_factor=float(scaling["factor"]),
                             original_seq_len=int(scaling["original_max_position_embeddings"]))
            attention.update({k: float(scaling[k]) for k in ("beta_fast", "beta_slow", "mscale", "mscale_all_dim")
                              if scaling.get(k) is not None})
        sigmoid = hf.get("scoring_func", "sigmoid" if model_type == "deepseek_v3" else "softmax") == "sigmoid"
        router: dict[str, Any] = ({"name": "aux_free", "norm_topk_prob": bool(hf.get("norm_topk_prob", True))} if sigmoid
                                  else {"name": "topk", "norm_topk_prob": bool(hf.get("norm_topk_prob", False)),
                                        "aux_loss_coef": float(hf.get("aux_loss_alpha", 0.001))})
        return ModelConfig(
            vocab_size=hf["vocab_size"], dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
            first_k_dense=hf.get("first_k_dense_replace", 0), n_heads=hf["num_attention_heads"],
            dense_ffn_dim=hf["intermediate_size"], moe_ffn_dim=hf["moe_intermediate_size"],
            n_routed_experts=hf["n_routed_experts"], n_activated_experts=hf["num_experts_per_tok"],
            n_shared_experts=hf.get("n_shared_experts") or 0, n_expert_groups=hf.get("n_group") or 1,
            n_limited_groups=hf.get("topk_group") or 1, route_scale=float(hf.get("routed_scaling_factor", 1.0)),
            mtp_depth=int(hf.get("num_nextn_predict_layers") or 0) if mtp else 0,
            norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            init_std=float(hf.get("initializer_range", 0.006)), max_seq_len=hf.get("max_position_embeddings", 4096),
            rope_theta=theta, tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention=attention, router=router,
        )
    except KeyError as exc:
        raise ConfigError(f"{path}: missing field {exc.args[0]!r} for a DeepSeek checkpoint") from None


def config_to_hf(cfg: ModelConfig, fp8: bool = False, mtp: bool = True) -> dict[str, Any]:
    """transformers' DeepseekV3 ``config.json`` for a moeframe MLA + DeepSeekMoE model."""
    att, router = dict(cfg.attention), dict(cfg.router)
    if att.get("name") != "mla" or router.get("name") not in ("aux_free", "topk"):
        raise ConfigError("only models with MLA attention and the aux_free/topk router export to HF DeepSeek")
    rope: dict[str, Any] = {"rope_theta": att.get("rope_theta") or cfg.rope_theta, "rope_type": "default"}
    if att.get("rope_factor", 1.0) != 1.0:
        rope.update(rope_type="yarn", factor=att["rope_factor"], original_max_position_embeddings=att["original_seq_len"],
                    beta_fast=att.get("beta_fast", 32.0), beta_slow=att.get("beta_slow", 1.0),
                    mscale=att.get("mscale", 1.0), mscale_all_dim=att.get("mscale_all_dim", 1.0))
    out = {
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim, "intermediate_size": cfg.dense_ffn_dim,
        "moe_intermediate_size": cfg.moe_ffn_dim, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_heads,
        "n_shared_experts": cfg.n_shared_experts, "n_routed_experts": cfg.n_routed_experts,
        "routed_scaling_factor": cfg.route_scale, "kv_lora_rank": att.get("kv_lora_rank", 512),
        "q_lora_rank": att.get("q_lora_rank", 1536), "qk_rope_head_dim": att.get("qk_rope_head_dim", 64),
        "v_head_dim": att.get("v_head_dim", 128), "qk_nope_head_dim": att.get("qk_nope_head_dim", 128),
        "n_group": cfg.n_expert_groups, "topk_group": cfg.n_limited_groups,
        "num_experts_per_tok": cfg.n_activated_experts, "first_k_dense_replace": cfg.first_k_dense,
        "norm_topk_prob": bool(router.get("norm_topk_prob", True)), "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len, "initializer_range": cfg.init_std,
        "rms_norm_eps": cfg.norm_eps, "tie_word_embeddings": cfg.tie_embeddings, "rope_parameters": rope,
        "rope_interleave": bool(att.get("rope_interleave", True)), "attention_bias": False,
        "num_nextn_predict_layers": cfg.mtp_depth if mtp else 0, "scoring_func": "sigmoid" if router["name"] == "aux_free" else "softmax",
        "topk_method": "noaux_tc" if router["name"] == "aux_free" else "greedy", "dtype": "bfloat16",
    }
    if fp8:
        out["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                      "weight_block_size": [128, 128]}
    return out


# -- reading --------------------------------------------------------------------------------------
def _shard_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise ConfigError(f"{folder}: shard {missing[0]} is listed in {index.name} but missing "
                              f"({len(missing)} missing in all); download the complete checkpoint")
        return [folder / n for n in names]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ConfigError(f"{folder} has no *.safetensors files: not an HF checkpoint folder")
    return files


def _scale_lookup(folder: Path, files: list[Path]) -> ScaleLookup:
    """FP8 scales found through the index's weight_map (or the shards' headers without one)."""
    index = folder / "model.safetensors.index.json"
    weight_map = json.loads(index.read_text())["weight_map"] if index.is_file() else None
    return ScaleLookup(folder, files, weight_map, _safe_open)


def _check_quantization(hf: dict[str, Any], path: Path) -> bool:
    q = hf.get("quantization_config")
    if q is None:
        return False
    if q.get("quant_method") != "fp8" or list(q.get("weight_block_size", [])) != [128, 128]:
        raise ConfigError(f"{path}: unsupported quantization_config {q}; moeframe reads BF16/FP32 checkpoints and "
                          "DeepSeek's FP8 format (quant_method fp8, weight_block_size [128, 128])")
    return True


def read_hf_config(folder: str | Path, mtp: bool = True) -> tuple[dict[str, Any], ModelConfig]:
    folder = Path(folder)
    cfg_path = folder / "config.json"
    if not folder.is_dir() or not cfg_path.is_file():
        raise ConfigError(f"{folder} is not an HF checkpoint folder (no config.json)")
    hf = json.loads(cfg_path.read_text())
    return hf, config_from_hf(hf, str(cfg_path), mtp)


def _targets(decoder: Decoder) -> dict[str, tuple[torch.Tensor, Optional[int]]]:
    """HF key -> (moeframe tensor or expert slice owner, expert index)."""
    targets: dict[str, tuple[torch.Tensor, Optional[int]]] = {}
    for name, t in decoder.state_dict(keep_vars=True).items():
        if _NOT_IN_HF.search(name) or (decoder.config.tie_embeddings and name == "head.weight"):
            continue
        for hf_name, expert in hf_names(name, tuple(t.shape), decoder.config.n_layers):
            targets[hf_name] = (t, expert)
    return targets


def _skipped_on_import(hf_key: str, cfg: ModelConfig) -> bool:
    """MTP layers beyond the loaded depth, and the MTP layers' copies of the shared embedding and
    head (released checkpoints store them; moeframe shares the main model's)."""
    m = re.match(r"model\.layers\.(\d+)\.(.+)", hf_key)
    if m is None or int(m.group(1)) < cfg.n_layers:
        return False
    return int(m.group(1)) >= cfg.n_layers + cfg.mtp_depth or m.group(2) in (
        "embed_tokens.weight", "shared_head.head.weight")


def from_hf(path: str | Path, dtype: torch.dtype = torch.float32, progress: bool = True, mtp: bool = True) -> Decoder:
    """Load an HF DeepSeek-V3/V2 folder into a moeframe ``Decoder`` (see the module docstring);
    ``mtp=False`` drops the checkpoint's multi-token-prediction layers."""
    from tqdm.auto import tqdm

    folder = Path(path)
    hf, cfg = read_hf_config(folder, mtp)
    fp8 = _check_quantization(hf, folder / "config.json")
    files = _shard_files(folder)
    decoder = build_decoder(cfg, device="meta")
    decoder.to_empty(device="cpu")
    decoder.init_weights()  # buffers that checkpoints do not carry start from their defaults
    decoder.to(dtype)
    targets, filled = _targets(decoder), set()
    scales = _scale_lookup(folder, files) if fp8 else None
    for file in tqdm(files, desc="loading shards", disable=not progress):
        with _safe_open(file) as f:
            keys = set(f.keys())
            for key in sorted(keys):
                if key.endswith("weight_scale_inv") or _skipped_on_import(key, cfg):
                    continue  # scales are read with their weight
                if key not in targets:
                    raise ConfigError(f"{file.name}: unexpected tensor {key!r} for this config; is config.json "
                                      "the one that belongs to these shards?")
                value = f.get_tensor(key)
                if value.dtype == torch.float8_e4m3fn:
                    if scales is None:
                        raise ConfigError(f"{file.name}: {key} is FP8 but config.json has no quantization_config "
                                          "(quant_method fp8); is config.json the one that belongs to these shards?")
                    value = dequantize_blocks(value, scales.scale_for(key, file, f))
                _copy_into(targets[key], value, key, file)
                filled.add(key)
    missing = sorted(set(targets) - filled)
    if missing:
        raise ConfigError(f"{folder}: {len(missing)} tensor(s) missing from the checkpoint, e.g. {missing[0]!r}")
    return decoder


def _copy_into(target: tuple[torch.Tensor, Optional[int]], value: torch.Tensor, key: str, file: Path) -> None:
    tensor, expert = target
    dest = tensor[expert] if expert is not None else tensor
    if tuple(dest.shape) != tuple(value.shape):
        raise ConfigError(f"{file.name}: {key} has shape {tuple(value.shape)}, the config expects {tuple(dest.shape)}")
    with torch.no_grad():
        dest.copy_(value.to(dest.dtype))


# -- writing --------------------------------------------------------------------------------------
def _hf_state(decoder: Decoder, mtp: bool) -> Iterator[tuple[str, torch.Tensor]]:
    """The moeframe tensors to export, plus the released format's per-MTP-layer copies of the
    shared embedding and head."""
    cfg = decoder.config
    state = decoder.state_dict()
    for name, t in state.items():
        if _NOT_IN_HF.search(name) or (cfg.tie_embeddings and name == "head.weight"):
            continue
        if name.startswith("mtp.") and not mtp:
            continue
        yield name, t
    for k in range(cfg.mtp_depth if mtp else 0):
        # separate storage: safetensors refuses tensors that share memory
        yield f"@copy:model.layers.{cfg.n_layers + k}.embed_tokens.weight", state["embed.weight"].clone()
        yield f"@copy:model.layers.{cfg.n_layers + k}.shared_head.head.weight", state["head.weight"].clone()


def _hf_tensors(decoder: Decoder, fp8: bool, dtype: torch.dtype, mtp: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    for name, t in _hf_state(decoder, mtp):
        names = ([(name[len("@copy:"):], None)] if name.startswith("@copy:")
                 else hf_names(name, tuple(t.shape), decoder.config.n_layers))
        for hf_name, expert in names:
            value = (t[expert] if expert is not None else t).detach().cpu()
            keep_fp32 = "e_score_correction_bias" in hf_name or hf_name.endswith("mlp.gate.weight")
            if fp8 and value.dim() == 2 and not _NEVER_FP8.search(hf_name):
                q, scale = quantize_blocks(value)
                yield hf_name, q
                yield f"{hf_name}_scale_inv", scale
            else:
                yield hf_name, value.float().contiguous() if keep_fp32 else value.to(dtype).contiguous()


def to_hf(decoder: Decoder, out: str | Path, fp8: bool = False, dtype: torch.dtype = torch.bfloat16,
          shard_bytes: int = 4 << 30, progress: bool = True, mtp: bool = True) -> Path:
    """Write ``decoder`` as an HF DeepSeek-V3 folder (atomically: a partial folder is renamed at
    the end); ``mtp=False`` drops the MTP modules (inference-only export)."""
    from tqdm.auto import tqdm

    out = Path(out)
    if out.exists():
        raise ConfigError(f"{out} already exists; choose a new output folder")
    partial = out.parent / f"{out.name}.partial-{uuid.uuid4().hex[:8]}"
    partial.mkdir(parents=True)
    try:
        shards: list[list[str]] = [[]]  # keys per shard; tensors are written as each shard fills
        buffer: dict[str, torch.Tensor] = {}
        size = 0
        for key, value in tqdm(_hf_tensors(decoder, fp8, dtype, mtp), desc="writing tensors", disable=not progress):
            if size and size + value.nbytes > shard_bytes:
                _write_shard(partial, len(shards), buffer)
                shards.append([])
                buffer, size = {}, 0
            buffer[key], size = value, size + value.nbytes
            shards[-1].append(key)
        _write_shard(partial, len(shards), buffer)
        n, weight_map = len(shards), {}
        for i, keys in enumerate(shards, start=1):  # final names carry the shard count
            final = f"model-{i:05d}-of-{n:05d}.safetensors"
            os.rename(partial / f"model-{i:05d}.safetensors", partial / final)
            weight_map.update(dict.fromkeys(keys, final))
        total_size = sum(f.stat().st_size for f in partial.glob("*.safetensors"))
        index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
        (partial / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        (partial / "config.json").write_text(json.dumps(config_to_hf(decoder.config, fp8, mtp), indent=2))
        os.rename(partial, out)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return out


def _write_shard(folder: Path, n: int, tensors: dict[str, torch.Tensor]) -> None:
    save_file(tensors, str(folder / f"model-{n:05d}.safetensors"), metadata={"format": "pt"})


# -- moeframe checkpoints ------------------------------------------------------------------------
def load_moeframe(path: str | Path) -> Decoder:
    """A decoder from a Lightning checkpoint of a moeframe module or a plain moeframe folder
    (a LoRA fine-tuning checkpoint comes back with its adapters merged into the weights)."""
    path = Path(path)
    if path.is_dir():
        import yaml
        from safetensors.torch import load_file

        cfg = ModelConfig(**yaml.safe_load((path / "moeframe.yaml").read_text()))
        decoder = build_decoder(cfg)
        _load_state(decoder, _checked_read(path / "model.safetensors", lambda f: load_file(str(f))), path)
        return decoder
    ckpt = _checked_read(path, lambda f: torch.load(f, map_location="cpu", weights_only=True))
    cfg = ckpt.get("hyper_parameters", {}).get("config")
    if isinstance(cfg, dict):  # runs started by the CLI store the config as plain data
        cfg = ModelConfig(**cfg)
    if not isinstance(cfg, ModelConfig):
        raise ConfigError(f"{path} is not a checkpoint of a moeframe module (no hyper_parameters.config)")
    decoder = build_decoder(cfg)
    finetune = ckpt.get("moeframe_finetune") or {}
    if finetune.get("method") == "lora":  # a FinetuneModule with adapters: rebuild them, load, merge
        from moeframe.model.lora import LoRAOptions, apply_lora, merge_lora

        apply_lora(decoder, LoRAOptions(**finetune["lora"]))
    _load_state(decoder, {k[len("decoder."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("decoder.")}, path)
    if finetune.get("method") == "lora":
        merge_lora(decoder)
    return decoder


def _checked_read(file: Path, read: Any) -> Any:
    """``read(file)``; a truncated or corrupted file is one clear line, not a deserialiser's traceback."""
    from moeframe.errors import CheckpointError

    if not Path(file).exists():
        raise CheckpointError(f"{file} does not exist")
    try:
        return read(file)
    except Exception as exc:  # safetensors, zip and pickle readers each raise their own types
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CheckpointError(f"{file} cannot be read ({first[:200]}); it is truncated or corrupted: "
                              "copy or convert it again") from exc


def _safe_open(file: Path) -> Any:
    return _checked_read(file, lambda f: safe_open(f, framework="pt"))


def _load_state(decoder: Decoder, state: dict[str, torch.Tensor], path: Path) -> None:
    result = decoder.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not (decoder.config.tie_embeddings and k == "head.weight")]
    if missing or result.unexpected_keys:
        raise ConfigError(f"{path}: the weights do not match the config (missing {missing[:3]}, "
                          f"unexpected {result.unexpected_keys[:3]})")


def save_moeframe(decoder: Decoder, out: str | Path) -> Path:
    """A plain moeframe folder: ``moeframe.yaml`` (the ModelConfig) + ``model.safetensors``."""
    import yaml

    out = Path(out)
    out.mkdir(parents=True, exist_ok=False)
    (out / "moeframe.yaml").write_text(yaml.safe_dump({f.name: getattr(decoder.config, f.name) for f in fields(ModelConfig)}, sort_keys=False))
    state = {k: v.contiguous() for k, v in decoder.state_dict().items()
             if not (decoder.config.tie_embeddings and k == "head.weight")}  # tied: stored once
    save_file(state, str(out / "model.safetensors"))
    return out



# -- the command ----------------------------------------------------------------------------------
def convert_command(argv: list[str]) -> int:
    """``moeframe convert SRC DST``: HF folder -> moeframe folder, or moeframe -> HF folder."""
    import argparse

    p = argparse.ArgumentParser(
        allow_abbrev=False, prog="moeframe convert",
        description="Convert between HF DeepSeek-V3/V2 folders and moeframe checkpoints. The direction follows "
                    "SRC: an HF folder (config.json) becomes a moeframe folder; a Lightning .ckpt or a moeframe "
                    "folder (moeframe.yaml) becomes an HF folder.")
    p.add_argument("src")
    p.add_argument("dst", help="output folder (must not exist)")
    p.add_argument("--fp8", action="store_true", help="HF export: DeepSeek's FP8 block format")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16", help="HF export dtype")
    p.add_argument("--drop-mtp", action="store_true", help="leave the multi-token-prediction modules out")
    args = p.parse_args(argv)
    src, dst = Path(args.src), Path(args.dst)
    if dst.exists():
        raise ConfigError(f"{dst} already exists; choose a new output folder")
    if (src / "config.json").is_file():
        decoder = from_hf(src, mtp=not args.drop_mtp)
        partial = dst.parent / f"{dst.name}.partial-{uuid.uuid4().hex[:8]}"
        try:
            save_moeframe(decoder, partial)
            os.rename(partial, dst)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
        print(f"wrote moeframe checkpoint {dst} (moeframe.yaml + model.safetensors)")
    elif src.suffix == ".ckpt" or (src / "moeframe.yaml").is_file():
        to_hf(load_moeframe(src), dst, fp8=args.fp8, dtype=getattr(torch, args.dtype), mtp=not args.drop_mtp)
        print(f"wrote HF checkpoint {dst}{' (FP8 block format)' if args.fp8 else ''}")
    else:
        raise ConfigError(f"{src} is neither an HF folder (config.json) nor a moeframe checkpoint "
                          "(a Lightning .ckpt or a folder with moeframe.yaml)")
    return 0
