"""Which modules run in FP8, and the swap itself.

Two kinds of module run their GEMMs in FP8: ``nn.Linear`` (swapped for ``FP8Linear``, same
Parameters) and routed experts stored as stacked weights that declare the grouped-GEMM seam of
``ExpertsBase`` (moeframe's ``GroupedExperts``, the parallel plugin's ``EPExperts``), into which
an ``FP8GroupedGemm`` is installed with ``set_grouped_gemm``.

Default selection (DeepSeek-V3): every Linear and every stacked-experts module except what the
model declares high precision. A model declares it with a ``high_precision_modules()`` method returning names relative
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
from typing import Union

import torch
from torch import nn

from moeframe.plugin import ExpertsBase
from moeframe_fp8.grouped import FP8GroupedGemm
from moeframe_fp8.linear import SUPPORTED_DTYPES, FP8ConfigError, FP8Linear, FP8Recipe

FP8Module = Union[FP8Linear, FP8GroupedGemm]


class FP8SelectionError(FP8ConfigError):
    """A ``modules``/``exclude`` selection that cannot mean what the user wrote."""


def is_stacked_experts(module: nn.Module) -> bool:
    """Routed experts whose projections a precision plugin may take over: they declare the
    grouped-GEMM seam of ``ExpertsBase`` (``grouped_gemm_seam``)."""
    return isinstance(module, ExpertsBase) and module.has_grouped_gemm_seam()


def _eligible(module: nn.Module) -> bool:
    """A module FP8 can run: a Linear or stacked experts (converted ones count, so that a second
    conversion of the same model selects the same names)."""
    return isinstance(module, nn.Linear) or is_stacked_experts(module)


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


def _linears_for_pattern(
    pattern: str, named: list[tuple[str, nn.Module]], linears: dict[str, nn.Module], protected: set[str]
) -> dict[str, nn.Module]:
    """The modules one ``modules`` pattern selects: matched Linears/experts, and those inside a
    matched container (``decoder.layers.3`` means its Linears and experts)."""
    hits = [(n, m) for n, m in named if fnmatch.fnmatchcase(n, pattern)]
    if not hits:
        raise FP8SelectionError(
            f"fp8: modules pattern {pattern!r} matches no module; names look like: "
            f"{_examples(list(linears) or [n for n, _ in named])}"
        )
    chosen: dict[str, nn.Module] = {}
    for n, m in hits:
        if _eligible(m):
            if _covered(n, protected):
                raise FP8SelectionError(
                    f"fp8: module {n!r} is declared high precision by the model (embedding, output head, router "
                    "gate and norms stay BF16/FP32 in DeepSeek-V3's recipe); remove it from modules"
                )
            chosen[n] = m
        else:
            chosen.update({k: v for k, v in linears.items() if k.startswith(n + ".") and not _covered(k, protected)})
    if not chosen:
        what = _examples([f"{n} ({type(m).__name__})" for n, m in hits])
        raise FP8SelectionError(
            f"fp8: modules pattern {pattern!r} matches {what} but no module that may run in "
            "FP8; FP8 converts nn.Linear layers and routed experts with a grouped_gemm hook "
            "(GroupedExperts) only"
        )
    return chosen


def select_linears(root: nn.Module, modules: list[str] | None, exclude: list[str]) -> dict[str, nn.Module]:
    """Name → module (Linear or stacked experts) for every module to convert, checked against the
    user's patterns."""
    protected = high_precision_names(root)
    named = [(n, m) for n, m in root.named_modules() if n]
    linears = {n: m for n, m in named if _eligible(m)}
    if modules is None:
        chosen = {n: m for n, m in linears.items() if not _covered(n, protected)}
    else:
        chosen = {}
        for pattern in modules:
            chosen.update(_linears_for_pattern(pattern, named, linears, protected))
    for pattern in exclude:
        hits = [n for n in chosen if fnmatch.fnmatchcase(n, pattern) or _covered(n, {pattern})]
        if not hits and not any(fnmatch.fnmatchcase(n, pattern) for n, _ in named):
            raise FP8SelectionError(
                f"fp8: exclude pattern {pattern!r} matches no module; names look like: {_examples(list(linears))}"
            )
        for n in hits:
            del chosen[n]
    return chosen


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def _install_grouped_gemm(experts: ExpertsBase, recipe: FP8Recipe, name: str) -> None:
    """Hand the experts' three projections to an FP8GroupedGemm (once)."""
    current = experts.grouped_gemm
    if isinstance(current, FP8GroupedGemm):
        return
    if current is not None:
        raise FP8SelectionError(
            f"fp8: experts {name!r} already run their projections through {current!r}; two "
            f"plugins cannot both own them: exclude it (exclude: ['{name}'])"
        )
    for p in ("w1", "w2", "w3"):
        w = getattr(experts, p, None)
        if not isinstance(w, torch.Tensor) or w.dim() != 3 or w.dtype not in SUPPORTED_DTYPES:
            what = "missing" if not isinstance(w, torch.Tensor) else f"{w.dtype} of shape {tuple(w.shape)}"
            raise FP8ConfigError(
                f"fp8: experts {name!r} need float32/bfloat16/float16 stacked weights w1/w2/w3 "
                f"[experts, out, in]; {p} is {what}: exclude it (exclude: ['{name}'])"
            )
    experts.set_grouped_gemm(FP8GroupedGemm(recipe, name))


def converted_modules(root: nn.Module) -> dict[str, FP8Module]:
    """Name → FP8Linear / FP8GroupedGemm of everything in ``root`` that computes in FP8."""
    found: dict[str, FP8Module] = {}
    for n, m in root.named_modules():
        if isinstance(m, FP8Linear):
            found[n] = m
        elif is_stacked_experts(m) and isinstance(m.grouped_gemm, FP8GroupedGemm):
            found[n] = m.grouped_gemm
    return found


def convert_to_fp8(
    root: nn.Module, recipe: FP8Recipe, modules: list[str] | None = None, exclude: list[str] | None = None
) -> dict[str, FP8Module]:
    """Convert the selected modules of ``root`` in place; returns name → FP8Linear or FP8GroupedGemm
    (including any converted earlier, so calling it twice is harmless)."""
    chosen = select_linears(root, modules, list(exclude or []))
    for name, module in chosen.items():
        if isinstance(module, FP8Linear):
            continue
        if isinstance(module, nn.Linear):
            _set_submodule(root, name, FP8Linear.from_linear(module, recipe, name))
        else:
            _install_grouped_gemm(module, recipe, name)
    return converted_modules(root)
