"""``moeframe esft-select -c FINETUNE.yaml --out selection.json [--section.key value ...]``: score
the experts of the config's ``init_from`` model on its training data and write the ESFT selection
(``moeframe.training.esft`` scores; this module is its command line)."""

from __future__ import annotations

from collections.abc import Sequence

from moeframe.commands.signature import run_function
from moeframe.errors import ConfigError

PROG = "moeframe esft-select"


def _split(argv: list[str]) -> tuple[list[str], list[str]]:
    """(this command's own flags, the config overrides passed on to the training parser)."""
    own, overrides, i = [], [], 0
    while i < len(argv):
        flag = argv[i].split("=", 1)[0]
        if flag in ("-c", "--config", "--out"):
            take = 1 if "=" in argv[i] else 2
            own += argv[i : i + take]
            i += take
        elif flag in ("-h", "--help"):
            own.append(argv[i])
            i += 1
        else:
            overrides.append(argv[i])
            i += 1
    return own, overrides


def esft_select(*, config: str, out: str, overrides: Sequence[str] = ()) -> int:
    """Score the experts of a fine-tuning config's init_from model on its training data and write the
    ESFT expert selection (then set model.esft.selection to the file). Any --section.key value
    after these flags overrides the config, as for `moeframe fit`.

    Args:
        config: a fine-tuning config (configs/finetune/*.yaml) (-c)
        out: where to write the selection JSON
        overrides: the training parser's --section.key value words (not a flag)
    """
    from moeframe.badinput import check_output_path, config_problem
    from moeframe.commands.train import build_cli
    from moeframe.training.esft import write_selection

    check_output_path(out, "--out", folder=False)  # before minutes of scoring, not after
    if (problem := config_problem(["-c", config, *overrides])) is not None:
        raise ConfigError(problem)
    cli = build_cli(args=["-c", config, *overrides], run=False)
    module, data = cli.model, cli.datamodule
    if not hasattr(module, "compute_esft_selection"):
        raise ConfigError(f"{config}: model.class_path must be moeframe.training.finetune.FinetuneModule")
    selection = module.compute_esft_selection(module.initial_decoder(), data)
    path = write_selection(selection, out)
    for name, entry in selection["layers"].items():
        print(
            f"{name}: experts {entry['selected']} ({sum(entry['scores'][e] for e in entry['selected']):.1%} of the routing)"
        )
    print(f"wrote {path} ({selection['num_tokens']} answer tokens scored)")
    return 0


def command(argv: list[str]) -> int:
    own, overrides = _split(argv)
    return run_function(esft_select, own, PROG, short={"-c": "--config"}, overrides=overrides)
