"""The command front-ends' import paths from before ``moeframe.commands`` keep working for one
release: each old name runs the same command as ``moeframe COMMAND`` (same output, same exit
status), with exactly one FutureWarning that names what to call instead."""

from __future__ import annotations

import importlib
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from moeframe.cli import main

from .conftest import REPO, clean_env

OLD = [
    ("moeframe.convert.hf", "convert_command", "convert"),
    ("moeframe.inspect", "inspect_command", "inspect"),
    ("moeframe.data.prepare", "prepare_command", "prepare"),
    ("moeframe.generate", "generate_command", "generate"),
    ("moeframe.training.esft", "esft_select_command", "esft-select"),
    ("moeframe.scaffold", "new_plugin_command", "new-plugin"),
    ("moeframe.cli", "plugins_command", "plugins"),
]


def _run(fn, argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            status = fn(argv)
        except SystemExit as stop:  # --help ends the parser, old and new alike
            status = stop.code
    out = capsys.readouterr().out
    return status, out, [str(w.message) for w in caught if issubclass(w.category, FutureWarning)]


@pytest.mark.parametrize(("module", "name", "command"), OLD)
def test_old_command_function_runs_the_command_with_one_warning(
    module: str, name: str, command: str, capsys: pytest.CaptureFixture
) -> None:
    old = getattr(importlib.import_module(module), name)
    status, out, warned = _run(old, ["--help"], capsys)
    assert len(warned) == 1 and f"{module}.{name}" in warned[0] and f"main([{command!r}" in warned[0], warned
    new_status, new_out, _ = _run(lambda argv: main([command, *argv]), ["--help"], capsys)
    assert (status, out) == (new_status, new_out) and status == 0 and "usage" in out.lower()


def test_old_inspect_command_reports_like_the_new_one(capsys: pytest.CaptureFixture) -> None:
    import moeframe.inspect

    config = str(REPO / "configs/model/tiny.yaml")
    status, out, warned = _run(moeframe.inspect.inspect_command, [config], capsys)
    assert len(warned) == 1
    assert (status, out) == (0, _run(lambda argv: main(["inspect", *argv]), [config], capsys)[1])
    assert "parameters" in out.lower()


def test_old_cli_names_resolve_to_the_moved_ones(capsys: pytest.CaptureFixture) -> None:
    import moeframe.cli
    from moeframe.commands import train

    for name in ("default_loggers", "check_strategy_name", "resolve_plugin_args", "no_abbrev_parser_class"):
        with pytest.warns(FutureWarning, match=f"moeframe.commands.train.{name}"):
            assert getattr(moeframe.cli, name) is getattr(train, name)
    status, out, warned = _run(moeframe.cli.plugins_show_command, ["norm", "rmsnorm"], capsys)
    assert status == 0 and "rmsnorm" in out and len(warned) == 1
    with pytest.raises(AttributeError, match="no attribute 'never_was'"):
        moeframe.cli.never_was  # noqa: B018 (the attribute access is the test)


def test_python_dash_m_moeframe_generate_still_runs(tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "moeframe.generate", "--help"], env=clean_env(), capture_output=True, text=True
    )
    assert run.returncode == 0 and "usage" in run.stdout.lower(), run.stderr[-2000:]
    assert "FutureWarning" in run.stderr and "moeframe.generate.generate_command" in run.stderr
