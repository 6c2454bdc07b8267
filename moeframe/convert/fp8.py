"""DeepSeek-V3's FP8 block format for weights: E4M3 values with one fp32 scale per 128×128 block.

A weight ``W [out, in]`` is stored as ``float8_e4m3fn`` plus ``weight_scale_inv`` of shape
``[ceil(out/128), ceil(in/128)]``: ``W ≈ fp8_block.float() · weight_scale_inv[block]``. Blocks at
the right and bottom edges may be partial (dimensions that are not multiples of 128); their
scale covers only the elements that exist. ``scale = amax / 448`` (E4M3's largest finite value),
with amax floored at 1e-4 so an all-zero block does not divide by zero. On import a scale may also
be UE8M0 (``float8_e8m0fnu`` or raw exponent bytes, DeepSeek-V4's ``scale_fmt: ue8m0``) and be
named ``<module>.scale`` instead of ``<module>.weight_scale_inv`` (DeepSeek-V4's released names).

Where a scale lies: the released DeepSeek-V3 checkpoint does not keep every ``weight_scale_inv``
in its weight's shard (a shard boundary can fall between the two); ``model.safetensors.index.json``'s
``weight_map`` is the authority, as in DeepSeek's own ``fp8_cast_bf16.py``. :class:`ScaleLookup`
reads a scale from the shard the map names, opening another shard lazily (safetensors maps the
file and reads only the requested tensor), so converting never holds more than the current shard.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from moeframe.config import ConfigError
from moeframe.convert.fp4 import scales_as_float

BLOCK = 128
E4M3_MAX = 448.0
AMAX_FLOOR = 1e-4


def _blocks(n: int, block: int) -> int:
    return -(-n // block)


def _pad_to_blocks(w: torch.Tensor, block: int) -> torch.Tensor:
    rows, cols = w.shape
    return F.pad(w, (0, _blocks(cols, block) * block - cols, 0, _blocks(rows, block) * block - rows))


def dequantize_blocks(
    w_fp8: torch.Tensor, scale_inv: torch.Tensor, block: int = BLOCK, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``[out, in]`` in ``dtype`` from E4M3 values and their per-block scales."""
    rows, cols = w_fp8.shape
    expected = (_blocks(rows, block), _blocks(cols, block))
    if tuple(scale_inv.shape) != expected:
        raise ValueError(
            f"weight_scale_inv has shape {tuple(scale_inv.shape)}, expected {expected} "
            f"for a [{rows}, {cols}] weight in {block}x{block} blocks"
        )
    scale = scales_as_float(scale_inv).repeat_interleave(block, 0)[:rows].repeat_interleave(block, 1)[:, :cols]
    return (w_fp8.float() * scale).to(dtype)


def quantize_blocks(
    w: torch.Tensor, block: int = BLOCK, power_of_two: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(E4M3 weight, weight_scale_inv) for a 2-D weight, 128×128 blocks, amax scaling."""
    rows, cols = w.shape
    br, bc = _blocks(rows, block), _blocks(cols, block)
    tiles = _pad_to_blocks(w.float(), block).view(br, block, bc, block)
    amax = tiles.abs().amax(dim=(1, 3)).clamp_min(AMAX_FLOOR)
    scale = amax / E4M3_MAX
    if power_of_two:
        scale = torch.exp2(torch.ceil(torch.log2(scale)))
    q = (tiles / scale[:, None, :, None]).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return q.view(br * block, bc * block)[:rows, :cols].contiguous(), scale.contiguous()


class ScaleLookup:
    """``weight_scale_inv`` of an FP8 weight, from whichever shard of ``folder`` holds it.

    ``weight_map`` is the index's tensor -> shard file map; without an index it is built from the
    shards' headers (cheap: no tensor data is read). ``open_shard(path)`` returns a safetensors
    handle; at most ``keep_open`` other shards stay open (scales sit near their weights).
    """

    def __init__(
        self,
        folder: Path,
        files: list[Path],
        weight_map: dict[str, str] | None,
        open_shard: Callable[[Path], Any],
        keep_open: int = 2,
    ) -> None:
        self.folder, self.open_shard, self.keep_open = folder, open_shard, keep_open
        self.weight_map = weight_map if weight_map is not None else self._map_from_headers(files)
        self._handles: OrderedDict[str, Any] = OrderedDict()

    def _map_from_headers(self, files: list[Path]) -> dict[str, str]:
        weight_map: dict[str, str] = {}
        for file in files:
            weight_map.update(dict.fromkeys(self.open_shard(file).keys(), file.name))
        return weight_map

    def _handle(self, name: str) -> Any:
        if name not in self._handles:
            self._handles[name] = self.open_shard(self.folder / name)
            if len(self._handles) > self.keep_open:
                self._handles.popitem(last=False)  # dropping the handle unmaps the file
        self._handles.move_to_end(name)
        return self._handles[name]

    def scale_key(self, key: str, current: Any) -> str | None:
        """The name of the scale of quantised tensor ``key``: ``<key>_scale_inv`` (DeepSeek-V3,
        transformers) or, for ``<module>.weight``, ``<module>.scale`` (DeepSeek-V4's release);
        None when the folder holds neither."""
        names = [f"{key}_scale_inv"] + ([key[: -len("weight")] + "scale"] if key.endswith(".weight") else [])
        return next((n for n in names if n in self.weight_map or n in current.keys()), None)

    def is_scale(self, key: str, current: Any) -> bool:
        """Whether checkpoint tensor ``key`` is the scale of another tensor (read with it)."""
        if key.endswith("weight_scale_inv"):
            return True
        stem = key[: -len("scale")] if key.endswith(".scale") else None
        return stem is not None and (stem + "weight" in self.weight_map or stem + "weight" in current.keys())

    def scale_for(self, key: str, file: Path, current: Any, kind: str = "FP8") -> torch.Tensor:
        """The scale of ``kind``-quantised tensor ``key`` read from ``file`` (whose open handle is ``current``)."""
        scale_key = self.scale_key(key, current)
        if scale_key is None:
            raise ConfigError(
                f"{self.folder}: {key} (in {file.name}) is {kind} but {key}_scale_inv is in no shard; "
                "the checkpoint is incomplete: download or convert it again"
            )
        shard = self.weight_map.get(scale_key)
        if shard is None:
            shard = file.name  # an index that forgot a tensor of this very shard
        handle = current if shard == file.name else self._handle(shard)
        try:
            return handle.get_tensor(scale_key)
        except Exception as exc:  # safetensors' own error type for a key the shard lacks
            raise ConfigError(
                f"{self.folder}: model.safetensors.index.json puts {scale_key} in {shard}, which "
                "does not hold it; the index does not belong to these shards"
            ) from exc
