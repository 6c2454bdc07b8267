"""``moeframe plugins [--json]`` and ``moeframe plugins show KIND NAME [--json]``.

Listing reads package metadata only (nothing is imported, so a broken plugin shows up here and
fails only when a run selects it); ``show`` imports the one plugin it describes.
"""

from __future__ import annotations

import json as json_text
from typing import Any

from moeframe import registry
from moeframe.commands.signature import run_function
from moeframe.errors import ConfigError


def plugins(*, json: bool = False) -> int:
    """List installed moeframe plugins by kind, name, distribution and version; `moeframe plugins
    show KIND NAME` describes one plugin's options.

    Args:
        json: machine-readable output
    """
    infos = registry.all_plugins()
    if json:
        print(json_text.dumps([info.__dict__ for info in infos], indent=2))
        return 0
    for kind in registry.KINDS:
        print(f"{kind} ({registry.KINDS[kind].group})")
        names = registry.available(kind)
        if not names:
            print("  (none installed)")
        for name, regs in names.items():
            clash = "  <- CONFLICT: registered by several distributions" if len(regs) > 1 else ""
            for info in regs:
                print(f"  {name:<16} {info.distribution} {info.version}  [{info.value}]{clash}")
    return 0


def _yaml_value(value: Any) -> str:
    import yaml

    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def show(kind: str, name: str, *, json: bool = False) -> int:
    """Describe one plugin: its options with types, defaults and docs, read from the plugin's own
    code (installed third-party plugins included).

    Args:
        kind: the plugin kind (attention, router, experts, norm, residual, precision, strategy, hf_family)
        name: the plugin's registered name (see `moeframe plugins`)
        json: machine-readable output
    """
    from moeframe.optiondocs import REQUIRED, constructor_docs, option_docs, own_doc

    try:
        info = registry.resolve(kind, name)
        cls = registry.load(kind, name)
    except registry.PluginError as exc:
        raise ConfigError(str(exc)) from None
    model_part = isinstance(getattr(cls, "Options", None), type) and kind not in ("precision", "strategy")
    options = option_docs(cls.Options) if model_part else constructor_docs(cls)
    if json:
        rows = [
            {
                "name": o.name,
                "type": o.type_words,
                "required": o.default is REQUIRED,
                "default": None if o.default is REQUIRED else o.default,
                "doc": o.doc,
            }
            for o in options
        ]
        print(
            json_text.dumps(
                {**info.__dict__, "plugin_api": registry.declared_plugin_api(cls), "options": rows},
                indent=2,
                default=str,
            )
        )
        return 0
    print(
        f"{kind} plugin {name!r}: {info.value} from {info.distribution} {info.version} "
        f"(plugin API {registry.declared_plugin_api(cls)})"
    )
    summary = own_doc(cls).split("\n\n")[0].replace("\n", " ")
    if summary:
        print(f"  {summary}")
    where = f"model config: {kind}: {{name: {name}, OPTION: VALUE, ...}}" if model_part else "constructor arguments"
    print(f"options ({where}):" if options else "options: none")
    for o in options:
        default = "required" if o.default is REQUIRED else f"default {_yaml_value(o.default)}"
        print(f"  {o.name}: {o.type_words or 'any value'}; {default}")
        if o.doc:
            print(f"      {o.doc}")
    return 0


def command(argv: list[str]) -> int:
    if argv[:1] == ["show"]:
        return run_function(show, argv[1:], "moeframe plugins show")
    return run_function(plugins, argv, "moeframe plugins")
