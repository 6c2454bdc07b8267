"""The plugin registry: every swappable part of a moeframe model is found through entry points.

Each plugin kind owns one entry-point group (``moeframe.<kind>``). The entry-point *name* is the
name a config uses (``attention: {name: mha}``); its *value* points at the implementing class.
Built-in plugins are registered in moeframe's own ``pyproject.toml`` exactly like a third-party
package would be, so nothing here knows any plugin by name.

Discovery is lazy on purpose: listing reads package metadata only, and only the plugin a run
selects is imported. A plugin whose import is broken therefore cannot break a run that does not
use it, and its error names the distribution that shipped it.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata as md
import warnings
from dataclasses import dataclass
from functools import cache
from typing import Any

__all__ = [
    "KINDS",
    "PLUGIN_API",
    "SUPPORTED_PLUGIN_APIS",
    "PluginDeprecationWarning",
    "PluginError",
    "PluginInfo",
    "available",
    "declared_plugin_api",
    "all_plugins",
    "load",
    "clear_cache",
    "register_lightning_strategies",
]


# The plugin API this moeframe provides: the base classes' constructor and forward signatures,
# RouterOutput, the cache contract. A plugin declares the API it was written against as a class
# attribute, ``plugin_api = "1"``; a change that breaks existing plugins bumps this number, and a
# plugin targeting an API this moeframe does not provide is refused at load with both versions
# named, instead of failing later inside a forward pass. A plugin that declares nothing is taken
# to target "1", the API that existed before plugins declared one.
# API 2 adds the forward context and the layer index (moeframe.model.context); API-1 plugins are
# still called with their own signatures for this release, with one PluginDeprecationWarning.
PLUGIN_API = "2"
SUPPORTED_PLUGIN_APIS: tuple[str, ...] = ("1", "2")
DEPRECATED_PLUGIN_APIS: tuple[str, ...] = ("1",)
_UNDECLARED_PLUGIN_API = "1"


# the kinds whose signatures API 2 changed (precision and strategies are Lightning's, unchanged)
_CONTEXT_KINDS = ("attention", "router", "experts", "norm")


class PluginDeprecationWarning(FutureWarning):
    """A plugin uses a form moeframe still accepts but will remove (shown to users by default)."""


@dataclass(frozen=True)
class Kind:
    """A plugin kind: its entry-point group and the base type its plugins must subclass."""

    name: str
    base: str  # "module:attr", imported only when a plugin of this kind is loaded

    @property
    def group(self) -> str:
        return f"moeframe.{self.name}"

    def base_type(self) -> type:
        module, attr = self.base.split(":")
        return getattr(importlib.import_module(module), attr)


KINDS: dict[str, Kind] = {
    k.name: k
    for k in (
        Kind("attention", "moeframe.model.base:AttentionBase"),
        Kind("router", "moeframe.model.base:RouterBase"),
        Kind("experts", "moeframe.model.base:ExpertsBase"),
        Kind("norm", "moeframe.model.base:NormBase"),
        Kind("residual", "moeframe.model.base:ResidualBase"),
        # Precision and strategies are Lightning's own extension points.
        Kind("precision", "lightning.pytorch.plugins.precision:Precision"),
        Kind("strategy", "lightning.pytorch.strategies:Strategy"),
        # HF checkpoint families (DeepSeek-V3/V2, ...), registered under the model_type they read
        Kind("hf_family", "moeframe.convert.family:HFFamily"),
    )
}


class PluginError(ValueError):
    """A plugin could not be found, is ambiguous, or does not honour its contract."""


@dataclass(frozen=True)
class PluginInfo:
    """What the metadata says about one registered plugin (nothing imported)."""

    kind: str
    name: str
    value: str  # "package.module:Class"
    distribution: str
    version: str


def _kind(kind: str) -> Kind:
    if kind not in KINDS:
        raise PluginError(f"unknown plugin kind {kind!r}; the kinds are: {', '.join(KINDS)}")
    return KINDS[kind]


def _distribution_of(ep: md.EntryPoint) -> tuple[str, str]:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return "<unknown distribution>", "?"
    return dist.metadata["Name"] or dist.name, dist.version


@cache
def _discover(kind: str) -> tuple[PluginInfo, ...]:
    """All entry points of one kind, de-duplicated (an editable install can list a dist twice)."""
    seen: dict[tuple[str, str, str], PluginInfo] = {}
    for ep in md.entry_points(group=_kind(kind).group):
        dist, version = _distribution_of(ep)
        info = PluginInfo(kind, ep.name, ep.value, dist, version)
        seen.setdefault((info.name, info.value, info.distribution), info)
    return tuple(sorted(seen.values(), key=lambda i: (i.name, i.distribution)))


def clear_cache() -> None:
    """Forget discovered and loaded plugins (after installing a package at run time)."""
    _discover.cache_clear()
    _load_cached.cache_clear()


def all_plugins() -> list[PluginInfo]:
    """Every registered plugin of every kind, from metadata only."""
    return [info for kind in KINDS for info in _discover(kind)]


def available(kind: str) -> dict[str, list[PluginInfo]]:
    """Names of one kind mapped to the distributions that register them (normally exactly one)."""
    names: dict[str, list[PluginInfo]] = {}
    for info in _discover(kind):
        names.setdefault(info.name, []).append(info)
    return names


def _unknown_name_message(kind: Kind, name: str, names: list[str]) -> str:
    close = difflib.get_close_matches(name, names, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    listing = ", ".join(sorted(names)) or "none installed"
    if not names and kind.name in _CONTEXT_KINDS + ("residual",):
        # moeframe itself registers one of these: the installed metadata predates the kind
        listing += " (moeframe's own entry points are missing: reinstall moeframe, e.g. pip install -e .)"
    return (
        f"unknown {kind.name} plugin {name!r}.{hint} Available {kind.name} plugins: {listing}. "
        f"A package provides one by declaring an entry point in the group {kind.group!r} "
        f'(e.g. [project.entry-points."{kind.group}"] {name} = "your_pkg.module:Class") '
        "and being pip-installed."
    )


def resolve(kind: str, name: str) -> PluginInfo:
    """The one registration of ``name`` (metadata only), or a PluginError that says how to fix it."""
    k = _kind(kind)
    names = available(kind)
    if name not in names:
        raise PluginError(_unknown_name_message(k, name, list(names)))
    infos = names[name]
    if len(infos) > 1:
        who = " and ".join(f"{i.distribution} {i.version} ({i.value})" for i in infos)
        raise PluginError(
            f"{kind} plugin {name!r} is registered by more than one distribution: {who}. "
            "moeframe never picks one silently: uninstall one of them."
        )
    return infos[0]


@cache
def _load_cached(kind: str, name: str) -> Any:
    info = resolve(kind, name)
    module_name, _, attr = info.value.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in filter(None, attr.split(".")):
            obj = getattr(obj, part)
    except Exception as exc:  # a broken plugin is reported, it does not crash discovery
        raise PluginError(
            f"{kind} plugin {name!r} from distribution {info.distribution} {info.version} "
            f"failed to import ({info.value}): {type(exc).__name__}: {exc}"
        ) from exc
    base = _kind(kind).base_type()
    if not (isinstance(obj, type) and issubclass(obj, base)):
        raise PluginError(
            f"{kind} plugin {name!r} from distribution {info.distribution} {info.version} points at "
            f"{info.value}, which is not a subclass of {base.__module__}.{base.__qualname__}; "
            "the package must register a class derived from that base."
        )
    _check_plugin_api(obj, info)
    return obj


def declared_plugin_api(cls: type) -> str:
    """The plugin API a plugin class targets (its ``plugin_api`` attribute, as a string).

    The signatures a class is called with are those of the class that wrote its ``forward`` and
    ``__init__``: so the declaration is read from the nearest class in the MRO that defines
    ``plugin_api``, ``forward`` or ``__init__``. A subclass of an API-2 plugin that overrides
    ``forward`` without declaring an API is an API-1 plugin (it was written before declarations
    mattered); one that overrides nothing inherits its base's API."""
    for klass in cls.__mro__:
        own = vars(klass)
        if "plugin_api" in own:
            return str(own["plugin_api"])
        if "forward" in own or "__init__" in own:
            return _UNDECLARED_PLUGIN_API
    return _UNDECLARED_PLUGIN_API


# What an API-1 plugin of each kind changes to target API 2 (the deprecation warning says it).
API2_CHANGES: dict[str, str] = {
    "attention": "take forward(x_BTD, ctx) and read positions_T, document_ids_BT and cache from ctx",
    "router": "take __init__(config, options, layer_id) and forward(x_TD, ctx) (ctx.seq_len replaces "
    "takes_seq_len/seq_len)",
    "experts": "take __init__(config, options, num_experts, dim, hidden_dim, layer_id) and "
    "forward(x_TD, weights_TK, indices_TK, ctx)",
    "norm": "take __init__(dim, eps, options, layer_id=None) and forward(x, ctx=None)",
}


def api1_message(kind: str, name: str, distribution: str, version: str) -> str:
    """The one deprecation warning an API-1 plugin gets: what it is and what to change."""
    return (
        f"{kind} plugin {name!r} from distribution {distribution} {version} targets moeframe plugin "
        f"API 1, which is deprecated and will be removed in a future release; it still runs, called "
        f'with the API-1 signatures. To move to plugin API 2, set plugin_api = "2" and '
        f"{API2_CHANGES.get(kind, 'follow docs/guides/plugins.md')} (see docs/guides/plugins.md)."
    )


def _check_plugin_api(cls: type, info: PluginInfo) -> None:
    declared = declared_plugin_api(cls)
    if declared in DEPRECATED_PLUGIN_APIS and info.kind in _CONTEXT_KINDS:
        # once per plugin and process: loading is cached
        warnings.warn(
            api1_message(info.kind, info.name, info.distribution, info.version), PluginDeprecationWarning, stacklevel=2
        )
    if declared in SUPPORTED_PLUGIN_APIS:
        return
    from moeframe import __version__

    provided = " or ".join(SUPPORTED_PLUGIN_APIS)
    raise PluginError(
        f"{info.kind} plugin {info.name!r} from distribution {info.distribution} {info.version} targets "
        f"moeframe plugin API {declared}, but this moeframe ({__version__}) provides plugin API {provided}. "
        f"Install a release of {info.distribution} written for plugin API {PLUGIN_API}, or a moeframe "
        f"that provides plugin API {declared}."
    )


def load(kind: str, name: str) -> Any:
    """Import and return the class registered as ``name`` for ``kind``, checked against its base."""
    return _load_cached(kind, name)


def _lazy_strategy_factory(name: str) -> Any:
    def build(**kwargs: Any) -> Any:
        return load("strategy", name)(**kwargs)

    build.__name__ = f"moeframe_strategy_{name}"
    return build


def register_lightning_strategies() -> list[str]:
    """Make every ``moeframe.strategy`` plugin selectable as ``Trainer(strategy="<name>")``.

    Lightning's StrategyRegistry stores a factory per name; ours imports the plugin only when a
    Trainer asks for it, so an unused (or broken) strategy package costs nothing.
    """
    from lightning.pytorch.strategies import StrategyRegistry

    registered = []
    for name, infos in available("strategy").items():
        description = f"moeframe plugin from {infos[0].distribution} {infos[0].version}"
        StrategyRegistry.register(name, _lazy_strategy_factory(name), description=description, override=True)
        registered.append(name)
    return registered
