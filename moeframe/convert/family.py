"""Checkpoint families: how an HF ``model_type`` maps onto a moeframe decoder, as a plugin kind.

An HF checkpoint folder is a ``config.json`` plus safetensors shards whose keys follow one
model family's module tree (``model.layers.3.self_attn.q_a_proj.weight`` in DeepSeek-V3). The
names split in two, and so does the knowledge:

- the *family* (this kind, entry-point group ``moeframe.hf_family``, registered under the HF
  ``model_type`` it reads, e.g. ``deepseek_v3``) knows the tree: the model-wide config fields,
  which plugin each part of a checkpoint becomes, where each part of a decoder sits in the HF
  tree (``module_prefix``), the tensors of the core that are no plugin's (embedding, head,
  multi-token-prediction projections) and extras of its released format;
- each *part* (attention, router, experts, norm plugins and the core's dense FFN; see
  ``moeframe.model.hfnames.HFNamed``) knows its own tensors' names below that prefix and its
  own options' config fields.

The converter (``moeframe.convert.hf``) assembles the two; it names no family and no plugin.
"""

from __future__ import annotations

import abc
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from moeframe import registry
from moeframe.errors import ConfigError

if TYPE_CHECKING:
    import torch

    from moeframe.config import ModelConfig

__all__ = ["HFFamily", "HFTensor", "family_for_export", "family_for_model_type", "installed_families"]


@dataclass(frozen=True)
class HFTensor:
    """One tensor of an HF checkpoint and where it comes from in a moeframe state dict."""

    key: str  # the full HF key
    expert: int | None = None  # the slice of a tensor stacked over experts (dim 0), or the whole
    fp32: bool = False  # kept in fp32 in every export (router state, as HF's _keep_in_fp32_modules)
    quantizable: bool = True  # may be written as FP8 blocks when the export asks for them
    # the columns [a, b) of the last dim that this HF tensor holds, when the release stores one
    # moeframe tensor as several (DeepSeek-V4's MTP ``e_proj``/``h_proj`` halves of ``eh_proj``)
    columns: tuple[int, int] | None = None


class HFFamily(abc.ABC):
    """A family of HF checkpoints (one or more ``model_type`` values) and its moeframe form.

    Registered in the entry-point group ``moeframe.hf_family`` under each HF ``model_type`` it
    reads; the converter builds one instance per use with the name it was found by, and passes
    that name to every part's ``HFNamed`` declarations as ``family``.
    """

    display_name: ClassVar[str] = ""  # for messages, e.g. "DeepSeek-V3/V2"
    model_type: ClassVar[str] = ""  # the model_type written on export
    # A family whose config.json records per-layer plugin choices (``model.layers``) and a residual
    # other than the default sets these; otherwise such a model is refused on export rather than
    # written as a checkpoint that silently computes something else.
    records_per_layer_choices: ClassVar[bool] = False
    records_residual: ClassVar[bool] = False

    def __init__(self, name: str) -> None:
        self.name = name

    @abc.abstractmethod
    def config_from_hf(self, hf: dict[str, Any], path: str, mtp: bool) -> ModelConfig:
        """A ModelConfig (plugins chosen, their options from ``cls.options_from_hf``) from an HF
        ``config.json`` dict; ``mtp=False`` leaves the multi-token-prediction layers out. Raise
        ConfigError naming ``path`` and the field on a config this family cannot read."""

    @abc.abstractmethod
    def config_to_hf(self, config: ModelConfig, mtp: bool) -> dict[str, Any]:
        """The HF ``config.json`` of ``config`` (parts' fields from ``cls.hf_config``); raise
        ConfigError saying what to change when the model has no form in this family."""

    @abc.abstractmethod
    def module_prefix(self, module: str, config: ModelConfig) -> str | None:
        """The HF module path of the decoder module ``module`` (``layers.3.attn`` ->
        ``model.layers.3.self_attn``), or None when this family has no place for it."""

    def tensor_key(self, prefix: str, declared: str) -> str:
        """The full HF key of a part's tensor: its module prefix and the name the part declared.
        A family whose released files use older names for a part (Mixtral's ``w1`` for
        ``gate_proj``) renames here, keeping the part's declaration the same for every family."""
        return f"{prefix}.{declared}"

    def core_tensor(self, key: str, config: ModelConfig) -> HFTensor | list[HFTensor] | None:
        """The HF tensor of a state-dict key owned by no named part (the embedding, the head,
        core projections), or None when the family has none; a list of tensors with ``columns``
        when the release stores the key in pieces."""
        return None

    def exported_copies(
        self, state: dict[str, torch.Tensor], config: ModelConfig, mtp: bool
    ) -> Iterator[tuple[HFTensor, torch.Tensor]]:
        """Extra tensors the released format stores (copies of shared weights), written after the
        model's own; ``skipped_on_import`` must skip them on the way back."""
        return iter(())

    def skipped_on_import(self, hf_key: str, config: ModelConfig) -> bool:
        """True for checkpoint tensors the decoder does not hold (see ``exported_copies``)."""
        return False

    def source_key(self, stored: str, config: ModelConfig) -> str:
        """The family's name (the one ``module_prefix``/``tensor_key``/``core_tensor`` give) of the
        tensor a folder stores as ``stored``; the identity unless the family's released folders use
        other names than the ones it writes (DeepSeek-V4's bare release names, ``embed.weight``).
        Only import asks: scales are still found under the stored names, and export writes the
        family's own names."""
        return stored


def _load(name: str) -> HFFamily:
    return registry.load("hf_family", name)(name)


def installed_families() -> dict[str, HFFamily]:
    """Every installed family by registered name; a family whose package is broken is left out
    (a conversion that does not use it must not fail because of it)."""
    families: dict[str, HFFamily] = {}
    for name in sorted(registry.available("hf_family")):
        try:
            families[name] = _load(name)
        except registry.PluginError:
            continue
    return families


def _readable(families: dict[str, HFFamily]) -> str:
    shown = dict.fromkeys(f.display_name or n for n, f in families.items())
    return " / ".join(shown) or "(none installed)"


def family_for_model_type(model_type: Any, path: str) -> HFFamily:
    """The family registered for an HF ``model_type``, or a ConfigError listing the installed ones."""
    if isinstance(model_type, str) and model_type in registry.available("hf_family"):
        return _load(model_type)
    families = installed_families()
    raise ConfigError(
        f"{path}: model_type {model_type!r} is not a {_readable(families)} checkpoint; the installed "
        f"checkpoint families read model_type {', '.join(families) or 'nothing'}. A package adds a family "
        "by registering an HFFamily subclass in the entry-point group 'moeframe.hf_family'"
    )


def _structure_problem(family: HFFamily, config: ModelConfig) -> str | None:
    """What of the model's structure the family's checkpoints cannot record (see the class flags)."""
    from dataclasses import fields

    from moeframe.config import ModelConfig

    if config.layers and not family.records_per_layer_choices:
        return (
            "the model chooses plugins per layer (model.layers), which this family's checkpoints "
            "cannot record; export a model with one plugin per kind, or use a family that records them"
        )
    default = next(f for f in fields(ModelConfig) if f.name == "residual").default_factory()  # type: ignore[misc]
    residual = config.residual if isinstance(config.residual, dict) else {"name": config.residual}
    if residual.get("name") != default.get("name") and not family.records_residual:
        return (
            f"the model's residual stream {residual.get('name')!r} has no form in this family's "
            f"checkpoints (they assume {default.get('name')!r}); use a family that records it"
        )
    return None


def _export_problem(family: HFFamily, config: ModelConfig) -> str | None:
    if (problem := _structure_problem(family, config)) is not None:
        return problem
    try:
        family.config_to_hf(config, mtp=True)
    except ConfigError as exc:
        return str(exc)
    return None


def family_for_export(config: ModelConfig, name: str | None = None) -> HFFamily:
    """The family ``name``, or (None) the one installed family in which ``config`` has a form."""
    if name is not None:
        family = _load(name)
        problem = _export_problem(family, config)
        if problem:
            raise ConfigError(f"cannot export to HF family {name!r}: {problem}")
        return family
    by_class: dict[type, HFFamily] = {}
    for family in installed_families().values():  # one class may be registered for several model_types
        if type(family) not in by_class or family.name == family.model_type:
            by_class[type(family)] = family
    problems = {f.name: _export_problem(f, config) for f in by_class.values()}
    fits = [n for n, p in problems.items() if p is None]
    if len(fits) == 1:
        return next(f for f in by_class.values() if f.name == fits[0])
    if fits:
        raise ConfigError(
            f"the model has a form in several HF checkpoint families ({', '.join(fits)}); "
            "choose one with --family NAME (Python: family=NAME)"
        )
    reasons = "; ".join(f"{n}: {p}" for n, p in problems.items()) or "no checkpoint family is installed"
    raise ConfigError(f"the model has no form in any installed HF checkpoint family ({reasons})")
