"""The DeepSeek-V4 checkpoint family, registered as ``moeframe.hf_family`` ``deepseek_v4``.

What a V4 folder is: ``config.json`` of ``model_type: deepseek_v4`` and safetensors in the names
transformers writes (``DeepseekV4ForCausalLM.save_pretrained``) and reads: DeepSeek's reference
leaf names below ``model.layers.i`` (``attn.wq_a``, ``attn.compressor.wkv``, ``ffn.gate.tid2eid``,
``ffn.experts.3.w1``, ``hc_attn_fn``, ...), ``model.embed_tokens``, ``model.norm``,
``model.hc_head.*`` and ``head.weight``.

What the family decides (each part names its own tensors and options):
- the parts of an imported model: attention ``v4`` with the layer's ``layer_types`` entry as its
  ``layer_type``, router ``v4_hash`` for ``mlp_layer_types: hash_moe`` layers and ``v4_gate``
  otherwise, experts ``v4_swiglu``, residual ``hyper``; every layer is MoE (no dense layers);
- per-layer choices are recorded (``layer_types``, ``mlp_layer_types``), so export accepts them;
- where parts sit: block ``i`` is ``model.layers.i`` (``attn_norm``, ``attn``, ``ffn_norm``,
  ``ffn`` with ``gate``, ``experts``, ``shared_experts``); the residual's mixings sit on the
  layer itself (``hc_attn_fn``), its head (the last layer's) is ``model.hc_head``;
- attention tensors declared in transformers' module names (``q_a_proj``) are written in the
  reference names transformers' own folders use (``wq_a``), so either declaration converts;
- multi-token prediction: the released V4 folders carry one MTP layer (``mtp.0.*``: ``e_proj``,
  ``h_proj``, ``enorm``, ``hnorm``, ``norm``, ``hc_head_*`` and a block with a sliding-window
  attention and the gated router); transformers neither builds nor saves them. An import builds
  as many MTP depths as the folder holds layers (none for a folder transformers wrote) with the
  residual's ``mtp_streams: true``, the release's MTP on the hyper-connection streams (see
  ``moeframe_v4.hyper``): moeframe's ``eh_proj`` [D, 2D] is ``[e_proj, h_proj]`` side by side, so
  the two are read into and written from its halves. A model whose MTP runs on the collapsed state
  (``mtp_streams: false``) has no release form: its MTP layers are written as moeframe's
  ``mtp.k.eh_proj`` (as before this option existed) and read back from it.

DeepSeek's own folders (the ones published for download, e.g. DeepSeek-V4-Flash) differ from
transformers' in two ways, and import reads both (export writes transformers' form):
- bare tensor names: the tree has no root ``model.`` module (``embed.weight``, ``norm.weight``,
  ``hc_head_fn``, ``layers.3.attn.wq_a.weight``). Below a layer the names are the reference names
  this family already uses, so only these roots are renamed (``source_key``); transformers renames
  the same roots at load time (its ``conversion_mapping``) before it moves to its module names.
- older config fields: ``compress_ratios`` (per layer 0/4/128), ``num_hash_layers``,
  ``compress_rate_csa``/``_hca``, ``qk_rope_head_dim``, ``rope_scaling`` (YaRN for the compressed
  layers). transformers' own ``DeepseekV4Config`` folds them into ``layer_types``,
  ``mlp_layer_types``, ``compress_rates``, ``partial_rotary_factor`` and the nested
  ``rope_parameters``; the family lets it do so and reads the folded fields, so both agree on what
  such a folder means.
A folder in neither naming (no ``embed.weight`` nor ``model.embed_tokens.weight``) is refused at
config time.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from moeframe.plugin import ConfigError, HFFamily, HFTensor, ModelConfig, registry, resolve_model_config

__all__ = ["DeepSeekV4Family", "HASH", "GATE"]

HASH, GATE = "v4_hash", "v4_gate"
_MLP_TYPE = {HASH: "hash_moe", GATE: "moe"}
_BLOCK_PARTS = {"attn_norm": "attn_norm", "ffn_norm": "ffn_norm", "attn": "attn", "ffn": "ffn", "residual": ""}
_MTP_PARTS = {"enorm": "enorm", "hnorm": "hnorm", "eh_proj": "eh_proj", "norm": "norm"}
_MTP_LAYER = re.compile(r"mtp\.(\d+)\.")
_CORE = {"embed.weight": "model.embed_tokens.weight", "head.weight": "head.weight"}
# the roots of DeepSeek's released tree -> transformers' (module docstring); head.weight is the same
_RELEASE_ROOTS = (
    (re.compile(r"embed\.weight"), "model.embed_tokens.weight"),
    (re.compile(r"norm\.weight"), "model.norm.weight"),
    (re.compile(r"hc_head_(fn|base|scale)"), r"model.hc_head.hc_\1"),
    (re.compile(r"layers\.(\d+\..+)"), r"model.layers.\1"),
)
_EMBEDDINGS = ("embed.weight", "model.embed_tokens.weight")  # one of them in every V4 folder
# the release's config fields that transformers' DeepseekV4Config folds, and what it folds them into
_RELEASE_FIELDS = (
    "compress_ratios",
    "num_hash_layers",
    "compress_rate_csa",
    "compress_rate_hca",
    "qk_rope_head_dim",
    "rope_scaling",
)
_FOLDED_FIELDS = ("layer_types", "mlp_layer_types", "compress_rates", "partial_rotary_factor", "rope_parameters")
# transformers' attention module names -> the reference names of V4 folders (dotted path pieces)
_ATTN_RENAMES = (
    ("compressor.indexer.scorer.weights_proj.", "indexer.weights_proj."),
    ("compressor.indexer.q_b_proj.", "indexer.wq_b."),
    ("compressor.indexer.", "indexer.compressor."),
    ("position_bias", "ape"),
    ("gate_proj.", "wgate."),
    ("q_a_proj.", "wq_a."),
    ("q_a_norm.", "q_norm."),
    ("q_b_proj.", "wq_b."),
    ("kv_proj.", "wkv."),
    ("kv_norm.", "norm."),
    ("o_a_proj.", "wo_a."),
    ("o_b_proj.", "wo_b."),
    ("sinks", "attn_sink"),
)


def _attention_leaf(declared: str) -> str:
    """``compressor.indexer.kv_proj.weight`` -> ``indexer.compressor.wkv.weight`` (a name already
    in reference form passes unchanged)."""
    out, rest = "", declared
    while rest:  # left to right, each piece renamed once
        for old, new in _ATTN_RENAMES:
            if rest.startswith(old):
                out, rest = out + new, rest[len(old) :]
                break
        else:
            head, dot, rest = rest.partition(".")
            out += head + dot
    return out


def _runs(values: list[Any]) -> list[tuple[int, int, Any]]:
    """Consecutive equal values as (first, last, value)."""
    runs: list[tuple[int, int, Any]] = []
    for i, v in enumerate(values):
        if runs and runs[-1][2] == v:
            runs[-1] = (runs[-1][0], i, v)
        else:
            runs.append((i, i, v))
    return runs


class DeepSeekV4Family(HFFamily):
    """HF ``deepseek_v4`` folders (transformers' DeepseekV4ForCausalLM)."""

    display_name = "DeepSeek-V4"
    model_type = "deepseek_v4"
    records_per_layer_choices = True
    records_residual = True

    # -- config -----------------------------------------------------------------------------------
    def config_from_hf(self, hf: dict[str, Any], path: str, mtp: bool) -> ModelConfig:
        if hf.get("model_type") != "deepseek_v4":
            raise ConfigError(f"{path}: model_type {hf.get('model_type')!r} is not a DeepSeek-V4 checkpoint")
        hf = _folded_release_config(hf, path)
        keys = _folder_keys(Path(path).parent)
        _check_naming(keys, path)
        try:
            n = hf["num_hidden_layers"]
            layer_types = list(hf.get("layer_types") or [])
            mlp_types = list(hf.get("mlp_layer_types") or [])
            if len(layer_types) != n or len(mlp_types) != n:
                raise ConfigError(
                    f"{path}: layer_types and mlp_layer_types must list all {n} layers (transformers writes both)"
                )
            attention = {"name": "v4", **registry.load("attention", "v4").options_from_hf(self.name, hf)}
            gate = {"name": GATE, **registry.load("router", GATE).options_from_hf(self.name, hf)}
            hashed = {"name": HASH, **registry.load("router", HASH).options_from_hf(self.name, hf)}
            layers = [{"first": a, "last": b, "attention": {"layer_type": t}} for a, b, t in _runs(layer_types)]
            layers += [{"first": a, "last": b, "router": hashed} for a, b, t in _runs(mlp_types) if t == "hash_moe"]
            mtp_depth, streams = _mtp_in_folder(keys) if mtp else (0, True)
            return ModelConfig(
                vocab_size=hf["vocab_size"],
                dim=hf["hidden_size"],
                n_layers=n,
                first_k_dense=0,
                n_heads=hf["num_attention_heads"],
                dense_ffn_dim=hf["moe_intermediate_size"],
                moe_ffn_dim=hf["moe_intermediate_size"],
                n_routed_experts=hf["n_routed_experts"],
                n_activated_experts=hf["num_experts_per_tok"],
                n_shared_experts=hf.get("n_shared_experts", 1),
                route_scale=float(hf.get("routed_scaling_factor", 1.0)),
                mtp_depth=mtp_depth,
                norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                init_std=float(hf.get("initializer_range", 0.02)),
                max_seq_len=int(hf.get("max_position_embeddings", 4096)),
                rope_theta=float(hf.get("rope_theta", 10000.0)),
                tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
                attention=attention,
                router=gate,
                experts={"name": "v4_swiglu", **registry.load("experts", "v4_swiglu").options_from_hf(self.name, hf)},
                residual={
                    "name": "hyper",
                    **registry.load("residual", "hyper").options_from_hf(self.name, hf),
                    "mtp_streams": streams,
                },
                layers=layers,
            )
        except KeyError as exc:
            raise ConfigError(f"{path}: missing field {exc.args[0]!r} for a DeepSeek-V4 checkpoint") from None

    def _check_shape(self, config: ModelConfig, plan: Any) -> None:
        if config.first_k_dense != 0:
            raise ConfigError(
                f"DeepSeek-V4 checkpoints have no dense layers: set model.first_k_dense: 0 (got {config.first_k_dense})"
            )
        if config.n_shared_experts != 1:
            raise ConfigError(
                f"DeepSeek-V4 checkpoints have exactly one shared expert: set "
                f"model.n_shared_experts: 1 (got {config.n_shared_experts})"
            )
        for i in range(config.n_layers):
            layer = plan.layer(i)
            wanted = {"attention": ("v4",), "router": (HASH, GATE), "experts": ("v4_swiglu",), "residual": ("hyper",)}
            for kind, names in wanted.items():
                got = getattr(layer, kind).name
                if got not in names:
                    raise ConfigError(
                        f"DeepSeek-V4 checkpoints need {kind} {' or '.join(names)} in every layer; "
                        f"layer {i} uses {got!r}"
                    )

    def config_to_hf(self, config: ModelConfig, mtp: bool) -> dict[str, Any]:
        plan = resolve_model_config(config)
        self._check_shape(config, plan)
        out: dict[str, Any] = {
            "architectures": ["DeepseekV4ForCausalLM"],
            "model_type": self.model_type,
            "vocab_size": config.vocab_size,
            "hidden_size": config.dim,
            "num_hidden_layers": config.n_layers,
            "num_attention_heads": config.n_heads,
            "moe_intermediate_size": config.moe_ffn_dim,
            "n_routed_experts": config.n_routed_experts,
            "num_experts_per_tok": config.n_activated_experts,
            "n_shared_experts": config.n_shared_experts,
            "routed_scaling_factor": config.route_scale,
            "norm_topk_prob": True,
            "hidden_act": "silu",
            "max_position_embeddings": config.max_seq_len,
            "initializer_range": config.init_std,
            "rms_norm_eps": config.norm_eps,
            "rope_theta": config.rope_theta,
            "tie_word_embeddings": config.tie_embeddings,
            "num_nextn_predict_layers": config.mtp_depth if mtp else 0,
            "dtype": "bfloat16",
        }
        for kind in ("attention", "router", "experts", "residual"):
            choice = getattr(plan, kind)
            out.update(choice.cls.hf_config(self.name, config, choice.options))
        out["layer_types"] = [plan.layer(i).attention.options.layer_type for i in range(config.n_layers)]
        out["mlp_layer_types"] = [_MLP_TYPE[plan.layer(i).router.name] for i in range(config.n_layers)]
        return out

    # -- tensor names -----------------------------------------------------------------------------
    def module_prefix(self, module: str, config: ModelConfig) -> str | None:
        if module == "norm":
            return "model.norm"
        mtp = re.fullmatch(r"mtp\.(\d+)\.(.+)", module)
        if mtp is not None:
            k, rest = mtp.group(1), mtp.group(2)
            if rest in _MTP_PARTS:
                return f"mtp.{k}.{_MTP_PARTS[rest]}"
            block = re.fullmatch(r"block\.([a-z_]+)(\..+)?", rest)
            if block is None or block.group(1) not in _BLOCK_PARTS:
                return None
            part = _BLOCK_PARTS[block.group(1)]
            return f"mtp.{k}" + (f".{part}" if part else "") + (block.group(2) or "")
        block = re.fullmatch(r"layers\.(\d+)\.([a-z_]+)(\..+)?", module)
        if block is None or block.group(2) not in _BLOCK_PARTS:
            return None
        part = _BLOCK_PARTS[block.group(2)]
        return f"model.layers.{block.group(1)}" + (f".{part}" if part else "") + (block.group(3) or "")

    def tensor_key(self, prefix: str, declared: str) -> str:
        if declared.startswith("hc_head_"):  # the streams' final collapse
            leaf = declared[len("hc_head_") :]
            return "model.hc_head.hc_" + leaf if prefix.startswith("model.") else f"{prefix}.{declared}"
        if re.search(r"(^|\.)attn$", prefix):
            return f"{prefix}.{_attention_leaf(declared)}"
        return f"{prefix}.{declared}"

    def core_tensor(self, key: str, config: ModelConfig) -> HFTensor | list[HFTensor] | None:
        if key in _CORE:
            return HFTensor(_CORE[key], quantizable=False)
        module, _, leaf = key.rpartition(".")
        prefix = self.module_prefix(module, config) if module.startswith("mtp.") else None
        if prefix is None:
            return None
        if module.endswith(".eh_proj") and _mtp_streams(config, int(module.split(".")[1])):
            # the release's two projections are eh_proj's halves (embedding first), FP8 in the release
            k, d = module.split(".")[1], config.dim
            return [
                HFTensor(f"mtp.{k}.e_proj.{leaf}", columns=(0, d)),
                HFTensor(f"mtp.{k}.h_proj.{leaf}", columns=(d, 2 * d)),
            ]
        return HFTensor(f"{prefix}.{leaf}", quantizable=False)

    def source_key(self, stored: str, config: ModelConfig) -> str:
        """A released folder's bare root names as transformers' (``embed.weight`` ->
        ``model.embed_tokens.weight``, ``layers.3.`` -> ``model.layers.3.``); others unchanged."""
        for bare, named in _RELEASE_ROOTS:
            if (m := bare.fullmatch(stored)) is not None:
                return m.expand(named)
        return stored

    def skipped_on_import(self, hf_key: str, config: ModelConfig) -> bool:
        """MTP layers beyond the model's depth (an import with ``mtp=False`` builds none)."""
        m = _MTP_LAYER.match(hf_key)
        return m is not None and int(m.group(1)) >= config.mtp_depth


def _mtp_streams(config: ModelConfig, k: int) -> bool:
    """Whether MTP depth k (block n_layers + k) runs in the release's stream form."""
    residual = resolve_model_config(config).layer(config.n_layers + k).residual
    return bool(getattr(residual.options, "mtp_streams", False))


def _folder_keys(folder: Path) -> list[str]:
    """Every tensor name of an HF folder, from its index or its shards' headers (no data read)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            return list(json.loads(index.read_text()).get("weight_map", {}))
        except (OSError, ValueError, AttributeError):
            return []  # the converter reports a broken index itself, naming it
    from safetensors import safe_open

    keys: list[str] = []
    for shard in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(shard), framework="pt") as f:
                keys += list(f.keys())
        except Exception:  # noqa: BLE001 (safetensors' own error types) the converter names a bad shard itself
            continue
    return keys


def _mtp_in_folder(keys: list[str]) -> tuple[int, bool]:
    """(MTP depths a folder of these tensors holds, whether in the release's stream form): ``mtp.k.e_proj``
    is the release's, ``mtp.k.eh_proj`` moeframe's collapsed-state MTP; a folder transformers wrote has none."""
    layers = {int(m.group(1)) for key in keys if (m := _MTP_LAYER.match(key))}
    depth = max(layers) + 1 if layers else 0
    return depth, not any(key.startswith("mtp.0.eh_proj.") for key in keys)


def _folded_release_config(hf: dict[str, Any], path: str) -> dict[str, Any]:
    """``hf`` with the release's older fields folded by transformers' ``DeepseekV4Config`` (module
    docstring); a config without them is returned as it is (transformers not needed)."""
    older = [k for k in _RELEASE_FIELDS if k in hf]
    if not older:
        return hf
    try:
        from transformers import DeepseekV4Config
    except ImportError:
        raise ConfigError(
            f"{path}: reading DeepSeek's released config fields ({', '.join(older)}) needs transformers: "
            "pip install 'transformers>=5.24'"
        ) from None
    try:
        folded = DeepseekV4Config.from_dict(dict(hf)).to_dict()
    except (KeyError, ValueError, TypeError) as exc:
        raise ConfigError(
            f"{path}: transformers' DeepseekV4Config cannot read the fields {', '.join(older)} "
            f"({type(exc).__name__}: {exc}); compress_ratios take 0, 4 or 128 per layer"
        ) from None
    kept = {k: v for k, v in hf.items() if k not in _RELEASE_FIELDS}
    return {**kept, **{k: folded[k] for k in _FOLDED_FIELDS}}


def _check_naming(keys: list[str], path: str) -> None:
    """A folder with tensors must name them as DeepSeek's release or as transformers does."""
    if keys and not set(_EMBEDDINGS) & set(keys):
        raise ConfigError(
            f"{Path(path).parent}: its tensors (e.g. {sorted(keys)[0]!r}) follow neither DeepSeek's released "
            "V4 names (embed.weight, layers.N.attn.wq_a.weight) nor transformers' (model.embed_tokens.weight, "
            "model.layers.N...); give the folder as downloaded from DeepSeek or as transformers' save_pretrained wrote it"
        )
