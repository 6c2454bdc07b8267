"""``moeframe convert SRC DST``: HF checkpoint folders <-> moeframe checkpoints
(``moeframe.convert.hf`` does the conversion; this module is its command line)."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Literal

from moeframe.commands.signature import run_function
from moeframe.errors import ConfigError


def _check_family(family: str | None) -> None:
    import difflib

    from moeframe import registry

    known = sorted(registry.available("hf_family"))
    if family is not None and family not in known:
        close = difflib.get_close_matches(family, known, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(
            f"--family {family!r} is not an installed checkpoint family.{hint} "
            f"Choose one of {', '.join(known) or 'none installed'}"
        )


def convert(
    src: str,
    dst: str,
    *,
    fp8: bool = False,
    dtype: Literal["bfloat16", "float32"] = "bfloat16",
    drop_mtp: bool = False,
    family: str | None = None,
) -> int:
    """Convert between HF checkpoint folders (of an installed checkpoint family, DeepSeek-V3/V2
    first-party) and moeframe checkpoints. The direction follows SRC: an HF folder (config.json)
    becomes a moeframe folder; a Lightning .ckpt or a moeframe folder (moeframe.yaml) becomes an HF folder.
    An import dequantises FP8 blocks and FP4 experts (DeepSeek-V4's release); an export writes DTYPE,
    or FP8 blocks with --fp8, never FP4.

    Args:
        src: an HF folder, a Lightning .ckpt or a moeframe folder
        dst: output folder (must not exist)
        fp8: HF export: the FP8 block format (128x128 scales, as DeepSeek released)
        dtype: HF export dtype
        drop_mtp: leave the multi-token-prediction modules out
        family: HF export: the checkpoint family (default: the one installed family the model fits)
    """
    _check_family(family)
    source, out = Path(src), Path(dst)
    if out.exists():
        raise ConfigError(f"{out} already exists; choose a new output folder")
    from moeframe.badinput import check_output_path

    check_output_path(out, "output folder", folder=True)
    if (source / "config.json").is_file():
        _hf_to_moeframe(source, out, mtp=not drop_mtp)
        print(f"wrote moeframe checkpoint {out} (moeframe.yaml + model.safetensors)")
    elif source.suffix == ".ckpt" or (source / "moeframe.yaml").is_file():
        import torch

        from moeframe.convert.hf import load_moeframe, to_hf

        to_hf(load_moeframe(source), out, fp8=fp8, dtype=getattr(torch, dtype), mtp=not drop_mtp, family=family)
        print(f"wrote HF checkpoint {out}{' (FP8 block format)' if fp8 else ''}")
    else:
        raise ConfigError(
            f"{source} is neither an HF folder (config.json) nor a moeframe checkpoint "
            "(a Lightning .ckpt or a folder with moeframe.yaml)"
        )
    return 0


def _hf_to_moeframe(source: Path, out: Path, mtp: bool) -> None:
    """An HF folder as a moeframe folder at ``out``, written beside it and renamed when complete."""
    from moeframe.convert.hf import from_hf, save_moeframe

    decoder = from_hf(source, mtp=mtp)
    partial = out.parent / f"{out.name}.partial-{uuid.uuid4().hex[:8]}"
    try:
        save_moeframe(decoder, partial)
        os.rename(partial, out)
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def command(argv: list[str]) -> int:
    return run_function(convert, argv, "moeframe convert")
