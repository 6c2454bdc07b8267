"""The `moeframe` command: every shipped YAML, an end-to-end run with resume, and bad input."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moeframe.cli import build_cli, main
from moeframe.testing import TINY_RUN_FLAGS

from .conftest import REPO, clean_env

CONFIGS = REPO / "configs"
RUN_CONFIGS = sorted(p for p in CONFIGS.rglob("*.yaml") if p.parent.name != "model")
MODEL_CONFIGS = sorted((CONFIGS / "model").glob("*.yaml"))
FAST = [
    "--data.init_args.max_bytes",
    "300000",
    "--data.init_args.seq_len",
    "64",
    "--data.init_args.batch_size",
    "4",
    "--trainer.limit_val_batches",
    "2",
]


@pytest.mark.parametrize("config", RUN_CONFIGS, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_run_config_parses_and_instantiates(config: Path, tmp_path: Path) -> None:
    cli = build_cli(args=["-c", str(config), "--trainer.default_root_dir", str(tmp_path), *FAST], run=False)
    assert cli.model is not None and cli.datamodule is not None and cli.trainer is not None


@pytest.mark.parametrize("model_config", MODEL_CONFIGS, ids=lambda p: p.name)
def test_every_model_config_parses_through_the_cli(model_config: Path, tmp_path: Path) -> None:
    cli = build_cli(
        args=[
            "-c",
            str(CONFIGS / "pretrain" / "tiny.yaml"),
            "--model.init_args.config",
            str(model_config),
            "--trainer.default_root_dir",
            str(tmp_path),
            *FAST,
        ],
        run=False,
    )
    assert cli.model.plan.config.n_layers > 0  # validated and resolved, nothing allocated yet
    assert cli.model.decoder is None


def _moeframe(args: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "moeframe.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=clean_env(),
    )


def _metrics(run_dir: Path) -> list[dict[str, str]]:
    rows: list[dict[str, str]] = []
    for f in sorted(run_dir.glob("logs/version_*/metrics.csv")):
        rows += list(csv.DictReader(f.open()))
    return rows


@pytest.mark.slow
def test_fit_end_to_end_then_resume(tmp_path: Path) -> None:
    common = [
        "fit",
        "-c",
        str(CONFIGS / "pretrain" / "tiny.yaml"),
        "--trainer.default_root_dir",
        str(tmp_path),
        "--trainer.val_check_interval",
        "3",
        "--trainer.log_every_n_steps",
        "1",
        *FAST,
    ]
    first = _moeframe([*common, "--trainer.max_steps", "6"], cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    rows = _metrics(tmp_path)
    columns = set(rows[0])
    assert {"train/loss", "train/ppl", "val/loss", "val/ppl", "lr-AdamW/pg1", "train/device/items_per_sec"} <= columns
    val = [(int(r["step"]), float(r["val/loss"])) for r in rows if r["val/loss"]]
    assert val[0][0] == 0 and len(val) == 3  # untrained baseline, then after steps 3 and 6
    assert all(torch.isfinite(torch.tensor(v)) for _, v in val)
    assert (tmp_path / "logs" / "version_0" / "loss_curves.png").stat().st_size > 10_000
    last = tmp_path / "logs" / "version_0" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=False)["global_step"] == 6
    # what `moeframe fit` writes is what `moeframe.convert` / `moeframe generate` read
    from moeframe.convert import load_moeframe

    assert load_moeframe(last).config.n_routed_experts == 8

    resumed = _moeframe([*common, "--trainer.max_steps", "9", "--ckpt_path", str(last)], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    new_rows = list(csv.DictReader((tmp_path / "logs" / "version_1" / "metrics.csv").open()))
    train_steps = sorted(int(r["step"]) for r in new_rows if r["train/loss"])
    # the step counter continued: only steps 7..9 were trained, logged at steps >= 6
    assert len(train_steps) == 3 and train_steps[0] >= 6
    resumed_ckpt = torch.load(tmp_path / "logs" / "version_1" / "checkpoints" / "last.ckpt", weights_only=False)
    assert resumed_ckpt["global_step"] == 9
    # the loss-curve history travelled in the checkpoint: the plot covers steps 0..9
    history = next(v for k, v in resumed_ckpt["callbacks"].items() if "LossCurvePlot" in k)
    assert history["val"][0][0] == 0 and history["train"][-1][0] == 9


BAD_INPUTS = [
    (["--model.init_args.config.attention.name", "mhx"], "unknown attention plugin 'mhx'. Did you mean 'mha'?"),
    (["--model.init_args.config.bogus_field", "3"], "unrecognized arguments: --config.bogus_field"),
    # a prefix of a real option is a typo, not that option (argparse would expand it silently)
    (
        ["--model.config.n_head", "2"],
        "unknown option model.init_args.config.n_head of PretrainModule. Did you mean model.init_args.config.n_heads?",
    ),
    (["--trainer.max_step", "2"], "unknown option trainer.max_step of Trainer. Did you mean trainer.max_steps?"),
    (["--model.init_args.config.n_heads", "5"], "model.n_heads=5 must divide model.dim=128"),
    (["--model.init_args.config.n_activated_experts", "9"], "larger than model.n_routed_experts"),
    (["--data.init_args.path", "/definitely/not/here"], "data.path '/definitely/not/here' does not exist"),
    (["--data.init_args.path", "EMPTY"], "the folder is empty"),
    (["--model.init_args.config.vocab_size", "100"], "set model.vocab_size to at least 257"),
]


@pytest.mark.bad_input
@pytest.mark.parametrize(("override", "message"), BAD_INPUTS, ids=[m[:30] for _, m in BAD_INPUTS])
def test_bad_input_gives_one_clear_line(
    override: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "empty").mkdir()
    override = [str(tmp_path / "empty") if a == "EMPTY" else a for a in override]
    code = main(
        ["fit", "-c", str(CONFIGS / "pretrain" / "tiny.yaml"), "--trainer.default_root_dir", str(tmp_path), *override]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and "Traceback" not in err and "Given value" not in err
    assert not list(tmp_path.rglob("*.ckpt"))  # nothing was trained


def test_bad_input_exit_status_from_the_shell(tmp_path: Path) -> None:
    result = _moeframe(
        ["fit", "-c", str(CONFIGS / "pretrain" / "tiny.yaml"), "--model.init_args.config.n_expert_groups", "3"],
        cwd=tmp_path,
        timeout=120,
    )
    assert result.returncode == 2
    assert "n_expert_groups=3 must divide" in result.stderr and "Traceback" not in result.stderr


def test_plugins_command_lists_builtins_as_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plugins", "--json"]) == 0
    listed = {(p["kind"], p["name"]): p for p in json.loads(capsys.readouterr().out)}
    assert listed[("router", "topk")]["distribution"] == "moeframe"
    assert listed[("attention", "mha")]["value"] == "moeframe.model.attention:MultiHeadAttention"


def test_print_config_shows_the_resolved_model(tmp_path: Path) -> None:
    result = _moeframe(
        ["fit", "-c", str(CONFIGS / "pretrain" / "tiny.yaml"), "--print_config"], cwd=tmp_path, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert (
        "n_routed_experts: 8" in result.stdout
        and "class_path: moeframe.training.pretrain.PretrainModule" in result.stdout
    )


# values that are only wrong next to each other: caught when the model and the data are instantiated
DATA_MODEL_CONFLICTS = [
    (["--data.init_args.seq_len", "2048"], "data.seq_len=2048 is longer than model.max_seq_len=1024"),
    (["--model.init_args.config.vocab_size", "100"], "the tokenizer has 257 tokens but model.vocab_size=100"),
    (
        ["--model.init_args.config.mtp_depth", "2", "--data.init_args.seq_len", "2"],
        "model.mtp_depth=2 leaves no token to predict in sequences of data.seq_len=2",
    ),
]


@pytest.mark.bad_input
@pytest.mark.parametrize(("override", "message"), DATA_MODEL_CONFLICTS, ids=["seq_len", "vocab_size", "mtp_depth"])
def test_data_and_model_conflicts_are_caught_at_config_time(
    override: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from moeframe.config import ConfigError

    args = ["-c", str(CONFIGS / "pretrain" / "tiny.yaml"), "--trainer.default_root_dir", str(tmp_path), *override]
    with pytest.raises(ConfigError, match=message):
        build_cli(args=args, run=False)  # instantiation only: no trainer, no fit, no decoder
    assert main(["fit", *args]) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("moeframe: error:")]
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in err, err[-3000:]


# -- runs sharing a default_root_dir -------------------------------------------------------------------
def test_log_version_claims_racing_in_processes_are_all_distinct(tmp_path: Path) -> None:
    """Eight processes claim a version in the same folder at the same moment: eight versions."""
    import multiprocessing

    from moeframe.training.logversions import claim_log_version

    (tmp_path / "logs" / "version_3").mkdir(parents=True)  # an earlier run's
    # spawn, not fork: a child forked from this multi-threaded test process can inherit a lock
    # another thread held at the fork and wait on it forever (seen once in CI: one worker hung)
    with multiprocessing.get_context("spawn").Pool(8) as pool:
        claimed = pool.map(claim_log_version, [tmp_path / "logs"] * 8)
    assert sorted(claimed) == list(range(4, 12))


def test_runs_in_the_same_root_dir_get_their_own_log_version(tmp_path: Path) -> None:
    """Lightning's loggers choose a version by listing folders when they first write, so two runs
    instantiated before either wrote took the same one; each CLI run now claims its own."""
    args = ["-c", str(CONFIGS / "pretrain" / "tiny.yaml"), "--trainer.default_root_dir", str(tmp_path), *FAST]
    first, second = build_cli(args=args, run=False), build_cli(args=args, run=False)
    assert [lg.version for lg in first.trainer.loggers] == [0] * len(first.trainer.loggers)
    assert [lg.version for lg in second.trainer.loggers] == [1] * len(second.trainer.loggers)
    assert first.trainer.log_dir != second.trainer.log_dir


@pytest.mark.bad_input
def test_a_run_stopped_at_config_time_leaves_no_empty_log_version(tmp_path: Path) -> None:
    assert (
        main(
            [
                "fit",
                "-c",
                str(CONFIGS / "pretrain" / "tiny.yaml"),
                "--trainer.default_root_dir",
                str(tmp_path),
                "--model.init_args.config.n_heads",
                "5",
            ]
        )
        == 2
    )
    assert not list((tmp_path / "logs").glob("version_*"))


@pytest.mark.slow
def test_two_runs_started_together_in_one_root_dir_both_keep_their_logs(tmp_path: Path) -> None:
    args = [
        "fit",
        "-c",
        str(CONFIGS / "pretrain" / "tiny.yaml"),
        "--trainer.default_root_dir",
        str(tmp_path),
        "--trainer.max_steps",
        "3",
        *TINY_RUN_FLAGS,
    ]
    runs = [
        subprocess.Popen(
            [sys.executable, "-m", "moeframe.cli", *args, "--seed_everything", str(seed)],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=clean_env(),
        )
        for seed in (1, 2)
    ]
    outputs = [run.communicate(timeout=300)[0] for run in runs]
    assert [run.returncode for run in runs] == [0, 0], "\n".join(out[-2000:] for out in outputs)
    losses = []
    for version in (0, 1):
        rows = list(csv.DictReader((tmp_path / "logs" / f"version_{version}" / "metrics.csv").open()))
        steps = [int(r["step"]) for r in rows if r.get("train/loss")]
        assert steps == [0, 1, 2], rows  # one run's rows, each step once
        losses.append([r["train/loss"] for r in rows if r.get("train/loss")])
        assert (tmp_path / "logs" / f"version_{version}" / "checkpoints" / "last.ckpt").is_file()
    assert losses[0] != losses[1]  # two different seeds: two different runs, not one run's rows twice
