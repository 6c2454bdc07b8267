"""The command layer (moeframe/commands): one parser behaviour for every command, built from typed
signatures; library modules never import it; commands that do not train never load Lightning and
the other heavy packages; ``new-plugin`` renders real template files."""

from __future__ import annotations

import ast
import importlib
import json
import subprocess
import sys
import warnings
from argparse import ArgumentError
from pathlib import Path

import pytest

from moeframe import registry
from moeframe.cli import EXTRA_COMMANDS, TRAINER_COMMANDS, main
from moeframe.commands import new_plugin
from moeframe.commands.boundary import user_error
from moeframe.commands.signature import CommandDeprecationWarning
from moeframe.errors import ConfigError
from moeframe.model.decoder import build_decoder

from .conftest import REPO, clean_env

COMMAND_MODULES = ("moeframe.commands", "moeframe.cli")
HEAVY = ("lightning", "pytorch_lightning", "deepspeed", "transformers", "matplotlib")


def _imports(path: Path) -> set[str]:
    """Modules a source file imports (absolute names, ``from a import b`` as ``a.b`` too)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def _is_command_module(name: str) -> bool:
    return any(name == m or name.startswith(m + ".") for m in COMMAND_MODULES)


def test_nothing_outside_the_command_layer_imports_it() -> None:
    roots = [REPO / "moeframe", *sorted((REPO / "plugins").glob("*/src")), REPO / "examples"]
    offenders = []
    for root in roots:
        for path in root.rglob("*.py"):
            rel = path.relative_to(REPO).as_posix()
            # deprecated_commands: the old X_command names' forwarders for one release (docs/cli.md);
            # library modules reach it only from their __getattr__, when an old name is asked for
            if rel.startswith("moeframe/commands/") or rel in ("moeframe/cli.py", "moeframe/deprecated_commands.py"):
                continue
            offenders += [f"{rel}: {name}" for name in sorted(_imports(path)) if _is_command_module(name)]
    assert not offenders, "library modules import the command layer:\n" + "\n".join(offenders)


def test_the_ast_scan_sees_an_import_of_the_command_layer(tmp_path: Path) -> None:
    (tmp_path / "m.py").write_text(
        "def f():\n    from moeframe.commands.train import build_cli\nfrom moeframe import cli\n"
    )
    assert {n for n in _imports(tmp_path / "m.py") if _is_command_module(n)} == {
        "moeframe.commands.train",
        "moeframe.commands.train.build_cli",
        "moeframe.cli",
    }


def _fresh(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=clean_env(), cwd=REPO
    )


def test_importing_the_model_and_training_loads_no_command_module() -> None:
    done = _fresh(
        "import sys, moeframe.model, moeframe.training\n"
        f"print([m for m in sys.modules if m.startswith({COMMAND_MODULES!r})])"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_commands_that_do_not_train_load_no_heavy_package(tmp_path: Path) -> None:
    """``moeframe --help``, ``plugins``, ``inspect``, ``convert`` and the other non-training commands
    in one fresh process: none of them imports Lightning, DeepSpeed, transformers or matplotlib, nor
    ``torch._dynamo`` (4 s: torch imports it for the first random fill of a meta tensor, which
    building a decoder on the meta device no longer makes)."""
    import yaml

    from moeframe.config import ModelConfig
    from moeframe.convert.hf import save_moeframe

    v3 = ModelConfig(**yaml.safe_load((REPO / "configs/model/tiny-v3.yaml").read_text()))
    save_moeframe(build_decoder(v3), tmp_path / "mf")
    # inspect names the strategy for its layout (ZeRO-1 by default, EP, pipeline) from the strategy
    # plugins' Lightning-free layout descriptions (entry-point group moeframe.strategy_layout)
    runs = [
        ["--help"],
        ["plugins"],
        ["plugins", "--json"],
        ["inspect", "configs/pretrain/tiny-v3.yaml", "--zero", "0"],
        ["inspect", "configs/pretrain/tiny-v3.yaml"],
        ["inspect", "configs/model/tiny.yaml", "--zero", "0", "--ep", "2", "--dp", "4"],
        ["inspect", "configs/model/tiny.yaml", "--pp", "2"],
        ["inspect", "configs/model/v3-671b.yaml", "--zero", "0", "--json"],
        ["convert", "--help"],
        ["convert", str(tmp_path / "mf"), str(tmp_path / "hf"), "--dtype", "float32"],
        ["prepare", "--help"],
        ["generate", "--help"],
        ["new-plugin", "norm", "probe_norm", "-o", str(tmp_path / "p")],
    ]
    code = (
        "import sys\nfrom moeframe.cli import main\ncodes = []\n"
        f"for argv in {runs!r}:\n"
        "    try:\n        codes.append(main(argv))\n    except SystemExit as exc:\n        codes.append(exc.code)\n"
        f"heavy = sorted({{m.split('.')[0] for m in sys.modules}} & {set(HEAVY)!r})\n"
        "print('CODES', codes, 'HEAVY', heavy, 'DYNAMO', 'torch._dynamo' in sys.modules)"
    )
    done = _fresh(code)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "--trainer.strategy zero1" in done.stdout and "--trainer.strategy ep2_ddp" in done.stdout, done.stdout
    last = done.stdout.strip().splitlines()[-1]
    assert last == f"CODES {[0] * len(runs)} HEAVY [] DYNAMO False", last
    assert (tmp_path / "p" / "pyproject.toml").exists() and (tmp_path / "hf" / "config.json").exists()


def test_the_overview_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in (*TRAINER_COMMANDS, *EXTRA_COMMANDS):
        assert f"\n  {name} " in out, name


@pytest.mark.parametrize("command", [*EXTRA_COMMANDS, "plugins show"])
def test_every_command_has_help_from_its_signature(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main([*command.split(), "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: moeframe {command}") and "Show this help message and exit" in out, out[:300]


@pytest.mark.bad_input
@pytest.mark.parametrize(
    "command, typo, meant",
    [
        (["plugins"], "--jsn", "--json"),
        (["plugins", "show", "attention", "mla"], "--jason", "--json"),
        (["inspect", "m.yaml"], "--seqlen", "--seq_len"),
        (["prepare", "x.txt", "-o", "out"], "--worker", "--workers"),
        (["convert", "a", "b"], "--drop_mpt", "--drop_mtp"),
        (["generate", "c.ckpt"], "--temprature", "--temperature"),
        (["new-plugin", "norm", "x"], "--output", "--out"),  # esft-select passes other flags on to the training parser
    ],
)
def test_an_unknown_flag_gets_the_same_did_you_mean_in_every_command(
    command: list[str],
    typo: str,
    meant: str,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main([*command, typo, "1"]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    prog = "moeframe " + " ".join(command[:2] if command[:2] == ["plugins", "show"] else command[:1])
    assert len(err) == 1 and err[0].startswith(
        f"moeframe {command[0]}: error: unknown option {typo} of {prog}. Did you mean {meant}?"
    ), err
    assert list(tmp_path.iterdir()) == []  # nothing ran


@pytest.mark.bad_input
def test_a_value_of_the_wrong_type_names_the_flag(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(REPO / "configs/model/tiny.yaml"), "--seq_len", "many"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "moeframe inspect: error: --seq_len: expected int. Got value: many; give a value of that type "
        "(see moeframe inspect --help)"
    ), err


def test_old_dashed_spellings_work_with_one_deprecation_warning(capsys: pytest.CaptureFixture[str]) -> None:
    config = str(REPO / "configs/model/tiny.yaml")
    assert main(["inspect", config, "--json", "--seq_len", "256"]) == 0
    new = json.loads(capsys.readouterr().out)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["inspect", config, "--json", "--seq-len", "256"]) == 0
    old = json.loads(capsys.readouterr().out)
    assert old == new and new["seq_len"] == 256
    deprecations = [w for w in caught if issubclass(w.category, CommandDeprecationWarning)]
    assert [str(w.message) for w in deprecations] == [
        "--seq-len is now spelled --seq_len; the old spelling will be removed in a later release"
    ]


def test_a_bool_flag_is_a_switch_or_takes_a_value(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plugins", "--json"]) == 0
    assert isinstance(json.loads(capsys.readouterr().out), list)
    assert main(["plugins", "--json", "false"]) == 0
    assert capsys.readouterr().out.startswith("attention (moeframe.attention)")


def test_the_words_of_a_list_positional_are_one_list(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for i in range(3):
        (tmp_path / f"doc{i}.txt").write_text(f"document {i} " * 50)
    inputs = [str(tmp_path / f"doc{i}.txt") for i in range(3)]
    assert main(["prepare", *inputs, "-o", str(tmp_path / "out"), "--workers", "1", "--val_permille", "0"]) == 0
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["documents"] == 3, meta


def test_a_config_error_wrapped_by_a_parser_is_reported_as_itself() -> None:
    """The argument parser re-raises what a class raised while it was built; the boundary finds the
    ConfigError by following the exception chain (no global list of raised errors)."""
    try:
        try:
            raise ConfigError("n_heads must divide dim; change one of them")
        except ConfigError as exc:
            raise ArgumentError(None, "Parser key 'model': a long message") from exc
    except ArgumentError as wrapped:
        assert user_error(wrapped, []) == "n_heads must divide dim; change one of them"
    assert not hasattr(ConfigError, "raised")


def test_the_training_cli_overrides_no_private_lightning_method() -> None:
    tree = ast.parse((REPO / "moeframe/commands/train.py").read_text())
    cli = next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == "MoeframeCLI")
    methods = [n.name for n in cli.body if isinstance(n, ast.FunctionDef)]
    assert "before_instantiate_classes" in methods
    assert [m for m in methods if m.startswith("_")] == []


# -- new-plugin templates ----------------------------------------------------------------------------
@pytest.mark.parametrize("kind", list(registry.KINDS))
def test_the_template_plugin_modules_are_real_modules(kind: str) -> None:
    """Each template is an importable module whose plugin class is named for ``template_name`` and
    targets the current plugin API; its tests parse; rendering leaves no template name behind."""
    module = importlib.import_module(f"moeframe.commands.templates.plugin.{kind}")
    cls = getattr(module, new_plugin.class_name(new_plugin.TEMPLATE_NAME, kind))
    assert registry.declared_plugin_api(cls) == registry.PLUGIN_API
    assert issubclass(cls, registry.KINDS[kind].base_type())
    ast.parse(new_plugin.template_text(f"check_{kind}.py"))
    files = new_plugin.render(kind, f"fresh_{kind}")
    for rel, text in files.items():
        assert "template" not in text.lower() and "TemplateName" not in text, rel
    assert f"{new_plugin.class_name(f'fresh_{kind}', kind)}" in files[f"src/moeframe_fresh_{kind}/plugin.py"]


def test_the_cli_page_lists_every_flag_of_every_command() -> None:
    from moeframe.commands import convert, esft_select, generate, inspect, plugins, prepare
    from moeframe.commands.signature import option_names

    table = (REPO / "docs" / "cli.md").read_text().split("## Flags by command")[1]
    functions = {
        "plugins": plugins.plugins,
        "plugins show": plugins.show,
        "inspect": inspect.inspect,
        "prepare": prepare.prepare,
        "convert": convert.convert,
        "generate": generate.generate,
        "esft-select": esft_select.esft_select,
        "new-plugin": new_plugin.new_plugin,
    }
    assert set(functions) == {*EXTRA_COMMANDS, "plugins show"}
    for name, function in functions.items():
        row = next(ln for ln in table.splitlines() if ln.startswith(f"| `{name}` |"))
        skip = {"out"} if name == "generate" else {"overrides"} if name == "esft-select" else set()
        for flag in set(option_names(function)) - {f"--{s}" for s in skip}:
            assert f"`{flag}`" in row or f"`-o`/`{flag}`" in row or f"`-c`/`{flag}`" in row, (name, flag)
