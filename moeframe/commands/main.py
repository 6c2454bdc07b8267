"""``moeframe COMMAND ...``: which command runs, and the overview ``moeframe --help``.

Only the chosen command's module is imported: ``moeframe plugins`` or ``moeframe inspect`` never
load Lightning (seconds of start-up); the training commands do, through ``commands.train``.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable

from moeframe.commands.boundary import guarded

TRAINER_COMMANDS = ("fit", "validate", "test", "predict")
_TRAINER_HELP = {
    "fit": "train a model (resume with --ckpt_path CKPT or last)",
    "validate": "evaluate a checkpoint on the validation data",
    "test": "evaluate a checkpoint on the test data",
    "predict": "run predict_step over the DataModule's predict data",
}


def _lazy(module: str) -> Callable[[list[str]], int]:
    """The ``command(argv)`` of ``moeframe.commands.<module>``, imported when the command runs."""
    return lambda argv: importlib.import_module(f"moeframe.commands.{module}").command(argv)


EXTRA_COMMANDS: dict[str, tuple[Callable[[list[str]], int], str]] = {
    "plugins": (
        _lazy("plugins"),
        "list installed plugins by kind, name, distribution and version; "
        "`plugins show KIND NAME`: one plugin's options",
    ),
    "convert": (_lazy("convert"), "HF DeepSeek-V3/V2 folders <-> moeframe checkpoints (BF16 or FP8 block format)"),
    "inspect": (
        _lazy("inspect"),
        "parameters, activated parameters, KV cache, FLOPs and memory of a model config (meta device)",
    ),
    "prepare": (_lazy("prepare"), "tokenise text/JSONL/Parquet once into Megatron-format token shards"),
    "generate": (_lazy("generate"), "generate text from a trained checkpoint (greedy or top-p sampling, KV cache)"),
    "esft-select": (
        _lazy("esft_select"),
        "score experts on a fine-tuning config's data and write the ESFT expert selection (JSON)",
    ),
    "new-plugin": (
        _lazy("new_plugin"),
        "write a plugin package skeleton (entry point, working plugin, contract tests) for KIND NAME",
    ),
}


def print_help(file=None) -> None:  # noqa: ANN001 (a text stream)
    file = file or sys.stdout
    print(
        "usage: moeframe COMMAND [options]   (moeframe COMMAND --help for a command's options)\n\n"
        "Train DeepSeek-V3-style Mixture-of-Experts models on PyTorch Lightning.\n\n"
        "training (LightningCLI: -c RUN.yaml [--section.key value ...] [--print_config]):",
        file=file,
    )
    for name, text in _TRAINER_HELP.items():
        print(f"  {name:<12} {text}", file=file)
    print("\nother commands:", file=file)
    for name, (_, text) in EXTRA_COMMANDS.items():
        print(f"  {name:<12} {text}", file=file)


def main(argv: list[str] | None = None) -> int:
    from_shell = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in EXTRA_COMMANDS:
        return guarded(f"moeframe {argv[0]}", lambda: EXTRA_COMMANDS[argv[0]][0](argv[1:]), argv)
    if not argv or argv[0] in ("-h", "--help"):
        print_help(sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    if argv[0] not in TRAINER_COMMANDS and not argv[0].startswith("-"):
        return _unknown_command(argv[0])
    from moeframe.commands.train import train_main

    return train_main(argv, from_shell)


def _unknown_command(name: str) -> int:
    import difflib

    known = [*TRAINER_COMMANDS, *EXTRA_COMMANDS]
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    print(
        f"moeframe: error: unknown command {name!r}.{hint} Choose one of {', '.join(known)} (see moeframe --help)",
        file=sys.stderr,
    )
    return 2
