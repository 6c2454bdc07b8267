"""``moeframe prepare INPUT... -o DIR``: tokenise text once into Megatron-format token shards
(``moeframe.data.prepare`` does the work; this module is its command line)."""

from __future__ import annotations

import os
from typing import Literal

from moeframe.commands.signature import run_function
from moeframe.errors import ConfigError


def prepare(
    inputs: list[str],
    *,
    output: str,
    tokenizer: str = "byte",
    eos_token: str | None = None,
    field: str = "text",
    val_permille: int = 50,
    workers: int = max(1, os.cpu_count() or 2),
    shard_tokens: int = 100_000_000,
    on_decode_error: Literal["skip", "error"] = "skip",
    overwrite: bool = False,
) -> int:
    """Tokenise text files, folders, JSONL or Parquet once into Megatron-format .bin/.idx shards with
    a held-out split and a meta.json recording the tokenizer.

    Args:
        inputs: text files, folders, .jsonl or .parquet files
        output: dataset folder to create (-o)
        tokenizer: 'byte' or the path of a HF tokenizer.json
        eos_token: end-of-document token (auto-detected)
        field: JSONL field / Parquet column holding the text
        val_permille: held-out share of documents, per mille (0: none)
        workers: tokenising processes
        shard_tokens: tokens per shard
        on_decode_error: non-UTF-8 files: skip them (counted, warned) or stop
        overwrite: replace a different dataset at --output
    """
    if not 0 <= val_permille < 1000:
        raise ConfigError(f"--val_permille must be between 0 and 999, got {val_permille}; give a share per mille")
    for name, value in (("workers", workers), ("shard_tokens", shard_tokens)):
        if value <= 0:
            raise ConfigError(f"--{name} must be a positive integer, got {value}; give a number above 0")
    from moeframe.badinput import check_output_path
    from moeframe.data.prepare import collect_sources
    from moeframe.data.prepare import prepare as prepare_dataset

    check_output_path(output, "--output", folder=True)
    summary = prepare_dataset(
        collect_sources(inputs),
        output,
        tokenizer,
        eos_token,
        field,
        val_permille,
        workers,
        shard_tokens,
        on_decode_error,
        overwrite,
    )
    print(summary.line())
    return 0


def command(argv: list[str]) -> int:
    return run_function(prepare, argv, "moeframe prepare", short={"-o": "--output"})
