"""``moeframe inspect MODEL.yaml``: what a model costs, computed on the meta device
(``moeframe.inspect`` does the counting; this module is its command line)."""

from __future__ import annotations

from pathlib import Path

from moeframe.commands.signature import run_function
from moeframe.errors import ConfigError
from moeframe.layout import BUILTIN_PRECISION


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if value <= 0:
            raise ConfigError(f"--{name} must be a positive integer, got {value}; give a number above 0")


def _check_precision(precision: str) -> None:
    import difflib

    from moeframe import registry

    choices = [BUILTIN_PRECISION, *sorted(registry.available("precision"))]
    if precision not in choices:
        close = difflib.get_close_matches(precision, choices, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(
            f"--precision {precision!r} is not {BUILTIN_PRECISION} or an installed precision plugin.{hint} "
            f"Choose one of {', '.join(choices)}"
        )


def inspect(
    config: str,
    *,
    json: bool = False,
    seq_len: int = 4096,
    zero: int = 1,
    dp: int = 1,
    ep: int = 1,
    precision: str = BUILTIN_PRECISION,
    pp: int | None = None,
    vpp: int | None = None,
    schedule: str = "1f1b",
    microbatches: int | None = None,
) -> int:
    """Parameters, activated parameters, KV cache, FLOPs and memory of a model config, computed on
    the meta device (nothing is allocated).

    Args:
        config: a model YAML (configs/model/*.yaml) or a run YAML that names one
        json: machine-readable output
        seq_len: sequence length for attention FLOPs
        zero: ZeRO stage for the memory estimate (0 = plain data parallel)
        dp: data-parallel ranks (including expert-parallel ones)
        ep: expert-parallel degree
        precision: bf16 or an installed precision plugin (its declared bytes per parameter)
        pp: pipeline ranks: per-stage parameters, activations, bubble
        vpp: virtual stages per pipeline rank (default: the schedule's)
        schedule: pipeline schedule (gpipe, 1f1b, interleaved_1f1b, ...)
        microbatches: micro-batches per batch (default: the stages)
    """
    import json as json_text
    from dataclasses import asdict

    from moeframe.inspect import inspect_model, load_model_config, print_report

    _check_positive(seq_len=seq_len, dp=dp, ep=ep)
    _check_precision(precision)
    model = load_model_config(config)
    report = inspect_model(model, Path(config).stem, seq_len, zero, dp, ep, precision)
    section = None
    if pp is not None:
        from moeframe.pipeline_estimate import pipeline_section

        section = pipeline_section(model, pp, vpp, schedule, microbatches, ep, seq_len)
    if json:
        print(json_text.dumps({**asdict(report), **({"pipeline": section} if section else {})}, indent=2))
    else:
        print_report(report, zero, dp, ep, precision)
        if section:
            from moeframe.pipeline_estimate import print_pipeline

            print_pipeline(section)
    return 0


def command(argv: list[str]) -> int:
    return run_function(inspect, argv, "moeframe inspect")
