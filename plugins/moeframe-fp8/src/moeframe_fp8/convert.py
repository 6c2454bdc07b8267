"""Which modules run in FP8, and the swap itself.

Default selection (DeepSeek-V3): every ``nn.Linear`` except what the model declares high
precision. A model declares it with a ``high_precision_modules()`` method returning names relative
to itself (moeframe's ``Decoder``: embedding, output head, routers, norms); the plugin reads that
instead of guessing from names, so a plugin router or norm is protected without this package
knowing it. Embeddings and norms are not Linears and are never touched either way.

``modules``/``exclude`` are shell-style patterns (``fnmatch``) over the names
``LightningModule.named_modules()`` prints, e.g. ``decoder.layers.*.attn.*``. A pattern that
matches nothing, or that names a module that cannot be FP8 (not a Linear, or declared high
precision), is an error naming it: a typo must not silently train in BF16.
"""

from __future__ import annotations

import fnmatch
from typing import Optional

from torch import nn

from moeframe_fp8.linear import FP8ConfigError, FP8Linear, FP8Recipe


class FP8SelectionError(FP8ConfigError):
    """A ``modules``/``exclude`` selection that cannot mean what the user wrote."""


def high_precision_names(root: nn.Module) -> set[str]:
    """Qualified names of every module some ``high_precision_modules()`` below ``root`` declares."""
    names: set[str] = set()
    for prefix, module in root.named_modules():
        declare = getattr(module, "high_precision_modules", None)
        if callable(declare):
            names.update(f"{prefix}.{n}" if prefix else n for n in declare())
    return names


def _covered(name: str, protected: set[str]) -> bool:
    """``name`` is a protected module or lies inside one."""
    return any(name == p or name.startswith(p + ".") for p in protected)


def _examples(names: list[str], n: int = 6) -> str:
    return ", ".join(names[:n]) + (", ..." if len(names) > n else "")


def _linears_for_pattern(pattern: str, named: list[tuple[str, nn.Module]], linears: dict[str, nn.Linear],
                         protected: set[str]) -> dict[str, nn.Linear]:
    """The Linears one ``modules`` pattern selects: matched Linears, and the Linears inside a
    matched container (``decoder.layers.3`` means its Linears)."""
    hits = [(n, m) for n, m in named if fnmatch.fnmatchcase(n, pattern)]
    if not hits:
        raise FP8SelectionError(f"fp8: modules pattern {pattern!r} matches no module; names look like: "
                                f"{_examples(list(linears) or [n for n, _ in named])}")
    chosen: dict[str, nn.Linear] = {}
    for n, m in hits:
        if isinstance(m, nn.Linear):
            if _covered(n, protected):
                raise FP8SelectionError(
                    f"fp8: module {n!r} is declared high precision by the model (embedding, output head, router "
                    "gate and norms stay BF16/FP32 in DeepSeek-V3's recipe); remove it from modules")
            chosen[n] = m
        else:
            chosen.update({k: v for k, v in linears.items() if k.startswith(n + ".") and not _covered(k, protected)})
    if not chosen and not any(isinstance(m, FP8Linear) for _, m in hits):
        what = _examples([f"{n} ({type(m).__name__})" for n, m in hits])
        raise FP8SelectionError(f"fp8: modules pattern {pattern!r} matches {what} but no nn.Linear that may run in "
                                "FP8; FP8 converts nn.Linear layers only (routed experts stored as stacked weights "
                                "are not Linears)")
    return chosen


def select_linears(root: nn.Module, modules: Optional[list[str]], exclude: list[str]) -> dict[str, nn.Linear]:
    """Name → Linear for every module to convert, checked against the user's patterns."""
    protected = high_precision_names(root)
    named = [(n, m) for n, m in root.named_modules() if n]
    linears = {n: m for n, m in named if isinstance(m, nn.Linear) and not isinstance(m, FP8Linear)}
    if modules is None:
        chosen = {n: m for n, m in linears.items() if not _covered(n, protected)}
    else:
        chosen = {}
        for pattern in modules:
            chosen.update(_linears_for_pattern(pattern, named, linears, protected))
    for pattern in exclude:
        hits = [n for n in chosen if fnmatch.fnmatchcase(n, pattern) or _covered(n, {pattern})]
        if not hits and not any(fnmatch.fnmatchcase(n, pattern) for n, _ in named):
            raise FP8SelectionError(f"fp8: exclude pattern {pattern!r} matches no module; names look like: "
                                    f"{_examples(list(linears))}")
        for n in hits:
            del chosen[n]
    return chosen


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def convert_to_fp8(root: nn.Module, recipe: FP8Recipe, modules: Optional[list[str]] = None,
                   exclude: Optional[list[str]] = None) -> dict[str, FP8Linear]:
    """Replace the selected Linears of ``root`` in place; returns name → FP8Linear (including any
    converted earlier, so calling it twice is harmless)."""
    chosen = select_linears(root, modules, list(exclude or []))
    for name, linear in chosen.items():
        _set_submodule(root, name, FP8Linear.from_linear(linear, recipe, name))
    return {n: m for n, m in root.named_modules() if isinstance(m, FP8Linear)}
