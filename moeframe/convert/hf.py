"""HF checkpoint folders in and out of moeframe, for any installed checkpoint family.

Import (``from_hf``): ``config.json``'s ``model_type`` selects the checkpoint family (an
``moeframe.hf_family`` plugin; DeepSeek-V3/V2 are the first-party ones), which turns it into a
``ModelConfig``; the safetensors shards are then read one at a time, each tensor copied straight
into the preallocated decoder (experts into their slice of the stacked expert weights), so peak
memory stays near the model plus one shard. FP8 shards (``float8_e4m3fn`` + ``weight_scale_inv``
or ``.scale``, fp32 or UE8M0 scales) and packed FP4 experts (DeepSeek-V4's ``expert_dtype: fp4``,
``moeframe.convert.fp4``) are dequantised on the way in; export writes bf16/fp32, or FP8 blocks
when asked (``fp8=True``), never FP4. Every expected tensor must be found exactly once; anything
missing, unexpected or of the wrong shape is an error naming the file and the key.

Export (``to_hf``): the inverse mapping, written as sharded safetensors with an index, a
``config.json`` transformers can load, and optionally the FP8 block format.

Names: this module knows none. Each part of the decoder (attention, router, experts and norm
plugins, the dense FFN) declares the HF names of its own tensors below its module
(``moeframe.model.hfnames.HFNamed``); the family says where each part sits in the HF module
tree and names the core's own tensors (``moeframe.convert.family``). ``tensor_map`` joins them.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from moeframe.config import ConfigError, ModelConfig
from moeframe.convert.family import HFFamily, HFTensor, family_for_export, family_for_model_type
from moeframe.convert.fp4 import dequantize_fp4, is_fp4_packed
from moeframe.convert.fp8 import ScaleLookup, dequantize_blocks, quantize_blocks
from moeframe.model.base import RouterBase
from moeframe.model.decoder import Decoder, build_decoder
from moeframe.model.hfnames import EXPERT, HFNamed


# -- names ----------------------------------------------------------------------------------------
def _part_of(key: str, parts: dict[str, nn.Module]) -> str | None:
    """The outermost named part holding state-dict ``key`` (MLA's inner norms belong to MLA)."""
    segments = key.split(".")
    for i in range(1, len(segments)):
        prefix = ".".join(segments[:i])
        if prefix in parts:
            return prefix
    return None


def _part_names(part: nn.Module, path: str, family: HFFamily) -> dict[str, str | None]:
    names = type(part).hf_tensor_names(family.name)  # type: ignore[attr-defined]
    if names is None:
        cls = type(part)
        raise ConfigError(
            f"{cls.__module__}.{cls.__qualname__} (at {path}) declares no HF tensor names, so it "
            f"cannot convert to or from HF family {family.name!r}: implement its hf_tensor_names()"
        )
    return names


def _part_tensors(
    key: str, shape: tuple[int, ...], path: str, part: nn.Module, family: HFFamily, config: ModelConfig
) -> list[HFTensor]:
    rel = key[len(path) + 1 :]
    names = _part_names(part, path, family)
    if rel not in names:
        raise ConfigError(
            f"{type(part).__qualname__} (at {path}) declares no HF name for its tensor {rel!r} "
            f"(it declares {sorted(names)}): add it to hf_tensor_names()"
        )
    template = names[rel]
    if template is None:  # moeframe-only state (a counter) that checkpoints do not carry
        return []
    prefix = family.module_prefix(path, config)
    if prefix is None:
        raise ConfigError(f"HF family {family.name!r} has no place for the decoder module {path!r}")
    # router state, and what the part declares, stays fp32 and is never quantised
    fp32 = isinstance(part, RouterBase) or rel in type(part).hf_fp32_tensors(family.name)
    if EXPERT in template:
        return [
            HFTensor(family.tensor_key(prefix, template.replace(EXPERT, str(k))), k, fp32, not fp32)
            for k in range(shape[0])
        ]
    return [HFTensor(family.tensor_key(prefix, template), None, fp32, not fp32)]


def tensor_map(decoder: Decoder, family: HFFamily) -> dict[str, list[HFTensor]]:
    """moeframe state-dict key -> its HF tensors in ``family`` (empty: not stored in HF folders).
    The head is left out of a model with tied embeddings (HF stores it once, as the embedding)."""
    cfg = decoder.config
    parts = {name: m for name, m in decoder.named_modules() if isinstance(m, HFNamed)}
    out: dict[str, list[HFTensor]] = {}
    for key, t in decoder.state_dict(keep_vars=True).items():
        if cfg.tie_embeddings and key == "head.weight":
            continue
        path = _part_of(key, parts)
        if path is not None:
            out[key] = _part_tensors(key, tuple(t.shape), path, parts[path], family, cfg)
            continue
        core = family.core_tensor(key, cfg)
        if core is None:
            raise ConfigError(f"moeframe tensor {key!r} has no HF name in family {family.name!r}")
        out[key] = core if isinstance(core, list) else [core]
    _check_unique(out, family)
    return out


def _check_unique(names: dict[str, list[HFTensor]], family: HFFamily) -> None:
    """Two moeframe tensors written to one HF key would silently keep only the last."""
    owner: dict[str, str] = {}
    for key, tensors in names.items():
        for t in tensors:
            if t.key in owner:
                raise ConfigError(
                    f"HF family {family.name!r} maps both {owner[t.key]!r} and {key!r} to the HF "
                    f"tensor {t.key!r}; the parts' hf_tensor_names or the family's module_prefix "
                    "must give each tensor its own name"
                )
            owner[t.key] = key


# -- config ---------------------------------------------------------------------------------------
def config_from_hf(hf: dict[str, Any], path: str = "config.json", mtp: bool = True) -> ModelConfig:
    """A ModelConfig from an HF ``config.json`` dict, by the family of its ``model_type``;
    ``mtp=False`` leaves the multi-token-prediction layers out."""
    return family_for_model_type(hf.get("model_type"), path).config_from_hf(hf, path, mtp)


def config_to_hf(cfg: ModelConfig, fp8: bool = False, mtp: bool = True, family: str | None = None) -> dict[str, Any]:
    """The HF ``config.json`` of ``cfg`` in ``family`` (default: the one installed family that fits)."""
    out = family_for_export(cfg, family).config_to_hf(cfg, mtp)
    if fp8:  # HF's fine-grained FP8 format, as DeepSeek released it
        out["quantization_config"] = {
            "quant_method": "fp8",
            "fmt": "e4m3",
            "activation_scheme": "dynamic",
            "weight_block_size": [128, 128],
        }
    return out


# -- reading --------------------------------------------------------------------------------------
def _shard_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        from moeframe.badinput import load_json_file

        weight_map = load_json_file(index, "HF shard index").get("weight_map")
        if not isinstance(weight_map, dict):
            raise ConfigError(f"{index} has no weight_map; download the complete checkpoint again")
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise ConfigError(
                f"{folder}: shard {missing[0]} is listed in {index.name} but missing "
                f"({len(missing)} missing in all); download the complete checkpoint"
            )
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


_SCALE_FMTS = (None, "float", "ue8m0")
_EXPERT_DTYPES = (None, "fp8", "fp4")


def _check_quantization(hf: dict[str, Any], path: Path) -> bool:
    """Whether the folder is quantised in a format moeframe reads: DeepSeek's FP8 blocks (128x128,
    fp32 or UE8M0 scales), with the routed experts optionally in FP4 (``expert_dtype: fp4``, V4)."""
    q = hf.get("quantization_config")
    if q is None:
        return False
    expert_dtype = q.get("expert_dtype", hf.get("expert_dtype")) if isinstance(q, dict) else None
    if (
        not isinstance(q, dict)
        or q.get("quant_method") != "fp8"
        or list(q.get("weight_block_size", [])) != [128, 128]
        or q.get("scale_fmt") not in _SCALE_FMTS
        or expert_dtype not in _EXPERT_DTYPES
    ):
        raise ConfigError(
            f"{path}: unsupported quantization_config {q}; moeframe reads BF16/FP32 checkpoints and "
            "DeepSeek's FP8 format (quant_method fp8, weight_block_size [128, 128], scale_fmt float or "
            "ue8m0, experts in fp8 or fp4)"
        )
    return True


def read_hf_config(folder: str | Path, mtp: bool = True) -> tuple[dict[str, Any], ModelConfig]:
    folder = Path(folder)
    cfg_path = folder / "config.json"
    if not folder.is_dir() or not cfg_path.is_file():
        raise ConfigError(f"{folder} is not an HF checkpoint folder (no config.json)")
    from moeframe.badinput import load_json_file

    hf = load_json_file(cfg_path, "HF config")
    return hf, config_from_hf(hf, str(cfg_path), mtp)


def _targets(decoder: Decoder, family: HFFamily) -> dict[str, _Target]:
    """HF key -> (moeframe tensor or expert slice owner, expert index, the columns it holds)."""
    state = decoder.state_dict(keep_vars=True)
    return {
        t.key: (state[name], t.expert, t.columns)
        for name, tensors in tensor_map(decoder, family).items()
        for t in tensors
    }


def from_hf(path: str | Path, dtype: torch.dtype = torch.float32, progress: bool = True, mtp: bool = True) -> Decoder:
    """Load an HF checkpoint folder of an installed family (DeepSeek-V3/V2 first-party) into a
    moeframe ``Decoder`` (see the module docstring); ``mtp=False`` drops the checkpoint's
    multi-token-prediction layers."""
    from tqdm.auto import tqdm

    folder = Path(path)
    hf, cfg = read_hf_config(folder, mtp)
    family = family_for_model_type(hf.get("model_type"), str(folder / "config.json"))
    fp8 = _check_quantization(hf, folder / "config.json")
    files = _shard_files(folder)
    decoder = build_decoder(cfg, device="meta")
    decoder.to_empty(device="cpu")
    decoder.init_weights()  # buffers that checkpoints do not carry start from their defaults
    decoder.to(dtype)
    targets, filled = _targets(decoder, family), set()
    scales = _scale_lookup(folder, files) if fp8 else None
    for file in tqdm(files, desc="loading shards", disable=not progress):
        with _safe_open(file) as f:
            keys = set(f.keys())
            for key in sorted(keys):
                name = family.source_key(key, cfg)  # the family's name of what the folder stores as key
                if name not in targets and (
                    key.endswith("weight_scale_inv") or (scales is not None and scales.is_scale(key, f))
                ):
                    continue  # scales are read with their weight
                if family.skipped_on_import(name, cfg):
                    continue
                if name not in targets:
                    raise ConfigError(
                        f"{file.name}: unexpected tensor {key!r} for this config; is config.json "
                        "the one that belongs to these shards?"
                    )
                value = _dequantized(f.get_tensor(key), key, file, f, scales, targets[name][0].is_floating_point())
                _copy_into(targets[name], value, key, file)
                filled.add(name)
    missing = sorted(set(targets) - filled)
    if missing:
        raise ConfigError(f"{folder}: {len(missing)} tensor(s) missing from the checkpoint, e.g. {missing[0]!r}")
    return decoder


def _dequantized(
    value: torch.Tensor, key: str, file: Path, handle: Any, scales: ScaleLookup | None, into_float: bool
) -> torch.Tensor:
    """A checkpoint tensor in full precision: FP8 blocks and packed FP4 (``moeframe.convert.fp4``)
    are dequantised with their scales; a quantised dtype moeframe does not read is one clear line."""
    fp8 = value.dtype == torch.float8_e4m3fn
    fp4 = into_float and is_fp4_packed(value)
    if fp4 and (scales is None or scales.scale_key(key, handle) is None):
        raise ConfigError(
            f"{file.name}: {key} is stored as {value.dtype} (packed FP4?) but "
            + ("config.json has no quantization_config" if scales is None else "the folder holds no scale for it")
            + "; this format is not understood: give the folder its quantization_config (expert_dtype fp4) and scales"
        )
    if not (fp8 or fp4):
        if value.dtype.is_floating_point and value.element_size() == 1:  # e5m2, e8m0, ...: not a weight format
            raise ConfigError(
                f"{file.name}: {key} is stored as {value.dtype}, a format moeframe does not understand "
                "(it reads float32/bfloat16/float16, FP8 e4m3 blocks and FP4 e2m1 experts); convert the folder to bf16"
            )
        return value
    if scales is None:
        raise ConfigError(
            f"{file.name}: {key} is FP8 but config.json has no quantization_config "
            "(quant_method fp8); is config.json the one that belongs to these shards?"
        )
    if fp8:
        return dequantize_blocks(value, scales.scale_for(key, file, handle))
    return dequantize_fp4(value, scales.scale_for(key, file, handle, kind="FP4"), key=f"{file.name}: {key}")


_Target = tuple[torch.Tensor, int | None, tuple[int, int] | None]


def _copy_into(target: _Target, value: torch.Tensor, key: str, file: Path) -> None:
    tensor, expert, columns = target
    dest = tensor[expert] if expert is not None else tensor
    dest = dest[..., columns[0] : columns[1]] if columns is not None else dest
    if tuple(dest.shape) != tuple(value.shape):
        raise ConfigError(f"{file.name}: {key} has shape {tuple(value.shape)}, the config expects {tuple(dest.shape)}")
    with torch.no_grad():
        dest.copy_(value.to(dest.dtype))


# -- writing --------------------------------------------------------------------------------------
def _hf_state(decoder: Decoder, family: HFFamily, mtp: bool) -> Iterator[tuple[HFTensor, torch.Tensor]]:
    """The tensors to export (an expert's slice of the stacked weights), then the family's extra
    copies of shared weights."""
    cfg = decoder.config
    state = decoder.state_dict()
    for name, tensors in tensor_map(decoder, family).items():
        if name.startswith("mtp.") and not mtp:
            continue
        for t in tensors:
            value = state[name][t.expert] if t.expert is not None else state[name]
            yield t, value[..., t.columns[0] : t.columns[1]] if t.columns is not None else value
    yield from family.exported_copies(state, cfg, mtp)


def _hf_tensors(
    decoder: Decoder, family: HFFamily, fp8: bool, dtype: torch.dtype, mtp: bool = True
) -> Iterator[tuple[str, torch.Tensor]]:
    for t, value in _hf_state(decoder, family, mtp):
        value = value.detach().cpu()
        if fp8 and value.dim() == 2 and t.quantizable:
            q, scale = quantize_blocks(value)
            yield t.key, q
            yield f"{t.key}_scale_inv", scale
        else:
            yield t.key, value.float().contiguous() if t.fp32 else value.to(dtype).contiguous()


def to_hf(
    decoder: Decoder,
    out: str | Path,
    fp8: bool = False,
    dtype: torch.dtype = torch.bfloat16,
    shard_bytes: int = 4 << 30,
    progress: bool = True,
    mtp: bool = True,
    family: str | None = None,
) -> Path:
    """Write ``decoder`` as an HF folder of ``family`` (default: the one installed checkpoint
    family the model fits, DeepSeek-V3 for MLA models), atomically: a partial folder is renamed
    at the end; ``mtp=False`` drops the MTP modules (inference-only export)."""
    from tqdm.auto import tqdm

    out = Path(out)
    if out.exists():
        raise ConfigError(f"{out} already exists; choose a new output folder")
    chosen = family_for_export(decoder.config, family)  # before any file exists: a model without an HF form
    tensor_map(decoder, chosen)  # and a part without declared names fail here
    partial = out.parent / f"{out.name}.partial-{uuid.uuid4().hex[:8]}"
    partial.mkdir(parents=True)
    try:
        shards: list[list[str]] = [[]]  # keys per shard; tensors are written as each shard fills
        buffer: dict[str, torch.Tensor] = {}
        size = 0
        for key, value in tqdm(
            _hf_tensors(decoder, chosen, fp8, dtype, mtp), desc="writing tensors", disable=not progress
        ):
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
        (partial / "config.json").write_text(json.dumps(config_to_hf(decoder.config, fp8, mtp, chosen.name), indent=2))
        os.rename(partial, out)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return out


def _write_shard(folder: Path, n: int, tensors: dict[str, torch.Tensor]) -> None:
    _save_safetensors(tensors, folder / f"model-{n:05d}.safetensors", metadata={"format": "pt"})


def _save_safetensors(tensors: dict[str, torch.Tensor], file: Path, metadata: dict[str, str] | None = None) -> None:
    """``save_file``, then the permissions every other output file gets (0666 less the umask):
    safetensors writes through a temporary file created 0600, which would leave the weights
    unreadable to the group that can read the config beside them."""
    save_file(tensors, str(file), metadata=metadata)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(file, 0o666 & ~umask)


# -- moeframe checkpoints ------------------------------------------------------------------------
def load_moeframe(path: str | Path) -> Decoder:
    """A decoder from a Lightning checkpoint of a moeframe module or a plain moeframe folder
    (a LoRA fine-tuning checkpoint comes back with its adapters merged into the weights)."""
    path = Path(path)
    if path.is_dir():
        from safetensors.torch import load_file

        cfg = folder_config(path)
        decoder = build_decoder(cfg)
        _load_state(decoder, _checked_read(path / "model.safetensors", lambda f: load_file(str(f))), path)
        return decoder
    ckpt = read_checkpoint_file(path)
    cfg = model_config_of_checkpoint(ckpt, path)
    decoder = build_decoder(cfg)
    finetune = ckpt.get("moeframe_finetune") or {}
    if finetune.get("method") == "lora":  # a FinetuneModule with adapters: rebuild them, load, merge
        from moeframe.model.lora import LoRAOptions, apply_lora, merge_lora

        apply_lora(decoder, LoRAOptions(**finetune["lora"]))
    _load_state(
        decoder, {k[len("decoder.") :]: v for k, v in ckpt["state_dict"].items() if k.startswith("decoder.")}, path
    )
    if finetune.get("method") == "lora":
        merge_lora(decoder)
    return decoder


def model_config_of_checkpoint(ckpt: dict[str, Any], path: str | Path) -> ModelConfig:
    """The ModelConfig stored in a Lightning checkpoint of a moeframe module."""
    cfg = (ckpt.get("hyper_parameters") or {}).get("config")
    if isinstance(cfg, dict):  # runs started by the CLI store the config as plain data
        try:
            cfg = ModelConfig(**cfg)
        except TypeError as exc:
            raise ConfigError(
                f"{path}: its stored model config does not fit this moeframe ({exc}); convert it "
                "with the moeframe version that wrote it"
            ) from None
    if not isinstance(cfg, ModelConfig) or "state_dict" not in ckpt:
        raise ConfigError(
            f"{path} is not a checkpoint of a moeframe module (no hyper_parameters.config / "
            "state_dict); pass a .ckpt written by `moeframe fit`"
        )
    return cfg


def _checked_read(file: Path, read: Any) -> Any:
    """``read(file)``; a truncated or corrupted file is one clear line, not a deserialiser's traceback."""
    from moeframe.errors import CheckpointError

    if not Path(file).exists():
        raise CheckpointError(f"{file} does not exist; check the path")
    if Path(file).is_dir():
        raise CheckpointError(f"{file} is a folder where a checkpoint file is expected; give the file's path")
    try:
        return read(file)
    except Exception as exc:  # safetensors, zip and pickle readers each raise their own types
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CheckpointError(
            f"{file} cannot be read ({first[:200]}); it is truncated or corrupted: copy or convert it again"
        ) from exc


def read_checkpoint_file(path: str | Path) -> dict[str, Any]:
    """A torch checkpoint file, read with ``weights_only=True`` (no arbitrary unpickling); a missing,
    truncated, corrupted or non-checkpoint file is one CheckpointError naming it."""
    from moeframe.errors import CheckpointError

    ckpt = _checked_read(Path(path), lambda f: torch.load(f, map_location="cpu", weights_only=True))
    if not isinstance(ckpt, dict):
        raise CheckpointError(
            f"{path} holds a {type(ckpt).__name__}, not a checkpoint; pass a .ckpt written by `moeframe fit`"
        )
    return ckpt


def _safe_open(file: Path) -> Any:
    return _checked_read(file, lambda f: safe_open(f, framework="pt"))


def _shape_differences(decoder: Decoder, state: dict[str, torch.Tensor]) -> str:
    """The tensors of ``state`` whose shape the decoder's differ from, in one line (our own check,
    not torch's message); imported here because only a failed load needs it."""
    from moeframe.training.checkpoint_io import state_dict_differences

    return state_dict_differences(decoder.state_dict(), state, names=False)


def _load_state(decoder: Decoder, state: dict[str, torch.Tensor], path: Path) -> None:
    from moeframe.errors import CheckpointError

    try:
        result = decoder.load_state_dict(state, strict=False)
    except RuntimeError:
        detail = _shape_differences(decoder, state)
        if not detail:
            raise  # not a mismatch: a bug, with its traceback
        raise CheckpointError(
            f"{path}: the weights do not match the model config stored with them ({detail[:300]}); "
            "the checkpoint is damaged: copy or convert it again"
        ) from None
    missing = [k for k in result.missing_keys if not (decoder.config.tie_embeddings and k == "head.weight")]
    if missing or result.unexpected_keys:
        raise ConfigError(
            f"{path}: the weights do not match the config (missing {missing[:3]}, "
            f"unexpected {result.unexpected_keys[:3]}); is this the config that belongs to them?"
        )


def folder_config(path: Path) -> ModelConfig:
    """The ModelConfig of a moeframe folder (``moeframe.yaml``)."""
    from moeframe.badinput import load_yaml_file

    data = load_yaml_file(path / "moeframe.yaml", "moeframe checkpoint config")
    try:
        return ModelConfig(**data)
    except TypeError as exc:
        raise ConfigError(
            f"{path / 'moeframe.yaml'}: not a model config ({exc}); convert the checkpoint again"
        ) from None


def save_moeframe(decoder: Decoder, out: str | Path) -> Path:
    """A plain moeframe folder: ``moeframe.yaml`` (the ModelConfig) + ``model.safetensors``."""
    import yaml

    out = Path(out)
    out.mkdir(parents=True, exist_ok=False)
    (out / "moeframe.yaml").write_text(
        yaml.safe_dump({f.name: getattr(decoder.config, f.name) for f in fields(ModelConfig)}, sort_keys=False)
    )
    state = {
        k: v.contiguous()
        for k, v in decoder.state_dict().items()
        if not (decoder.config.tie_embeddings and k == "head.weight")
    }  # tied: stored once
    _save_safetensors(state, out / "model.safetensors")
    return out


def __getattr__(name: str) -> Any:
    # the command front-end that lived here before moeframe.commands (deprecated, one release)
    from moeframe.deprecated_commands import old_name

    return old_name(__name__, name)
