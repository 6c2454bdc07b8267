"""The ``moeframe`` command.

``moeframe fit|validate|test|predict -c CONFIG.yaml [--section.key value ...]`` are LightningCLI
subcommands (``--print_config`` included); ``moeframe plugins [--json]`` lists the installed
plugins. A configuration mistake ends with one clear line and exit status 2, not a traceback.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from typing import Any, Callable, Optional

from moeframe import registry
from moeframe.config import ConfigError

TRAINER_COMMANDS = ("fit", "validate", "test", "predict")


def default_loggers(save_dir: str) -> list[dict[str, Any]]:
    """CSV always (plain files anyone can read); TensorBoard too when it is installed."""
    loggers = [{"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": save_dir, "name": "logs"}}]
    if importlib.util.find_spec("tensorboard") is not None:
        loggers.append({"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                        "init_args": {"save_dir": save_dir, "name": "logs"}})
    return loggers


def check_strategy_name(name: str) -> None:
    """An unknown ``--trainer.strategy`` name ends in one line with a did-you-mean, before
    Lightning launches any process (its own error is a traceback without suggestions)."""
    import difflib

    from lightning.pytorch.strategies import StrategyRegistry

    known = sorted(set(StrategyRegistry.available_strategies()) | {"auto"})
    if name in known:
        return
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ConfigError(f"unknown trainer.strategy {name!r}.{hint} Available: {', '.join(known)}. moeframe plugins "
                      f"add strategies through the entry-point group {registry.KINDS['strategy'].group!r}.")


def build_cli(args: Optional[list[str]] = None, run: bool = True, **kwargs: Any) -> Any:
    """The LightningCLI behind ``moeframe fit|validate|test|predict`` (``run=False`` to only
    parse and instantiate, as the config tests do)."""
    # imported here so `moeframe plugins` stays fast (lightning takes seconds to import)
    import lightning as L
    from lightning.pytorch.cli import LightningCLI

    class MoeframeCLI(LightningCLI):
        """LightningCLI over any LightningModule/DataModule (``class_path`` in the config)."""

        def before_instantiate_classes(self) -> None:
            config = self.config[self.subcommand] if self.subcommand else self.config
            trainer = config["trainer"]
            if isinstance(trainer.get("strategy"), str):
                check_strategy_name(trainer["strategy"])
            if trainer.get("logger") in (None, True):
                trainer["logger"] = default_loggers(trainer.get("default_root_dir") or ".")

    return MoeframeCLI(
        L.LightningModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"exit_on_error": False},
        auto_configure_optimizers=False,
        args=args,
        run=run,
        **kwargs,
    )


def plugins_command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="moeframe plugins", description="List installed moeframe plugins.")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    args = parser.parse_args(argv)
    infos = registry.all_plugins()
    if args.json:
        print(json.dumps([info.__dict__ for info in infos], indent=2))
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


EXTRA_COMMANDS: dict[str, tuple[Callable[[list[str]], int], str]] = {
    "plugins": (plugins_command, "list installed plugins by kind, name, distribution and version"),
    "convert": (lambda argv: importlib.import_module("moeframe.convert.hf").convert_command(argv),
                "HF DeepSeek-V3/V2 folders <-> moeframe checkpoints (BF16 or FP8 block format)"),
    "inspect": (lambda argv: importlib.import_module("moeframe.inspect").inspect_command(argv),
                "parameters, activated parameters, KV cache, FLOPs and memory of a model config (meta device)"),
    "prepare": (lambda argv: importlib.import_module("moeframe.data.prepare").prepare_command(argv),
                "tokenise text/JSONL/Parquet once into Megatron-format token shards"),
    "generate": (lambda argv: importlib.import_module("moeframe.generate").generate_command(argv),
                 "generate text from a trained checkpoint (greedy or top-p sampling, KV cache)"),
    "esft-select": (lambda argv: importlib.import_module("moeframe.training.esft").esft_select_command(argv),
                    "score experts on a fine-tuning config's data and write the ESFT expert selection (JSON)"),
}


def _print_extra_help() -> None:
    print("\nmoeframe also has:")
    for name, (_, text) in EXTRA_COMMANDS.items():
        print(f"  {name:<10} {text}")


def _parse_error_message(exc: Exception) -> str:
    """Our own ConfigErrors when they caused the failure, else the parser's first lines."""
    ours = list(dict.fromkeys(str(e) for e in ConfigError.raised))
    if ours:
        return "\n".join(ours)
    lines = [ln for ln in str(exc).splitlines() if not ln.strip().startswith(("Given value", "- Expected a <class 'NoneType'>", "Subtypes:"))]
    return "\n".join(lines) + "\n(run with --help to see the accepted options)"


def main(argv: Optional[list[str]] = None) -> int:
    from_shell = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in EXTRA_COMMANDS:
        try:
            return EXTRA_COMMANDS[argv[0]][0](argv[1:])
        except ConfigError as exc:
            print(f"moeframe {argv[0]}: error: {exc}", file=sys.stderr)
            return 2
    from argparse import ArgumentError

    ConfigError.raised.clear()
    try:
        registry.register_lightning_strategies()
        build_cli(args=None if from_shell else argv)
    except (ArgumentError, ValueError) as exc:
        # a ConfigError, raised directly (module setup) or wrapped by the parser while it
        # instantiated a class: report the original message, never a traceback
        if not (isinstance(exc, ArgumentError) or ConfigError.raised):
            raise
        print(f"moeframe: error: {_parse_error_message(exc)}", file=sys.stderr)
        return 2
    except SystemExit as exc:
        if exc.code == 0 and (not argv or argv[0] in ("-h", "--help")):
            _print_extra_help()
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
