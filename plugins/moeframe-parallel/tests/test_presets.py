"""Every preset trains the tiny MoE through ``moeframe fit`` on 2 CPU processes, checkpoints
and resumes; expert parallelism follows the same loss trajectory as plain DDP.

Each case is two real runs of the command line (subprocesses, clean environment, timeouts):
2 optimizer steps from scratch, then a resume from that run's ``last.ckpt`` to step 4.
"""

from __future__ import annotations

import csv
import importlib.util
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from moeframe import registry
from moeframe.testing import TINY_RUN_FLAGS, check_strategy_contract

_spec = importlib.util.spec_from_file_location("_ptest_helpers", Path(__file__).with_name("_helpers.py"))
helpers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(helpers)

CONFIG = helpers.REPO / "configs" / "pretrain" / "tiny-parallel.yaml"
PRESETS = ["ddp", "ep2_ddp", "fsdp2", "zero1", "zero2", "zero3", "zero3_offload"]


FLAGS = list(TINY_RUN_FLAGS)


def fit(
    root: Path, strategy: str, max_steps: int, cache: Path, ckpt: Path | None = None
) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "moeframe.cli",
        "fit",
        "-c",
        str(CONFIG),
        "--trainer.strategy",
        strategy,
        "--trainer.max_steps",
        str(max_steps),
        "--trainer.default_root_dir",
        str(root),
        *FLAGS,
    ]
    if ckpt is not None:
        cmd += ["--ckpt_path", str(ckpt)]
    return subprocess.run(
        cmd,
        env=helpers.clean_env(MOEFRAME_CACHE=str(cache)),
        cwd=root.parent,
        capture_output=True,
        text=True,
        timeout=420,
    )


def train_losses(version_dir: Path) -> dict[int, float]:
    with open(version_dir / "metrics.csv") as f:
        return {int(row["step"]): float(row["train/loss"]) for row in csv.DictReader(f) if row.get("train/loss")}


@pytest.fixture(scope="module")
def run_preset(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], dict]:
    """Runs a preset's fit + resume once per module; returns losses and the checkpoints."""
    cache = tmp_path_factory.mktemp("data-cache")
    done: dict[str, dict] = {}

    def run(strategy: str) -> dict:
        if strategy in done:
            return done[strategy]
        root = tmp_path_factory.mktemp(strategy) / "run"
        if strategy in registry.available("strategy"):
            # a moeframe strategy plugin: moeframe.testing's contract (registers, trains 2 steps
            # on 2 CPU processes through the CLI) is the first run
            check_strategy_contract(
                strategy,
                devices=2,
                max_steps=2,
                root=root,
                run_config=CONFIG,
                args=FLAGS,
                env=helpers.clean_env(MOEFRAME_CACHE=str(cache)),
                timeout=420,
            )
        else:  # Lightning's own ddp, the reference
            first = fit(root, strategy, 2, cache)
            assert first.returncode == 0, first.stderr[-4000:]
        ckpt = root / "logs" / "version_0" / "checkpoints" / "last.ckpt"
        assert ckpt.exists(), f"{strategy}: no checkpoint written"
        second = fit(root, strategy, 4, cache, ckpt=ckpt)
        assert second.returncode == 0, second.stderr[-4000:]
        losses = {**train_losses(root / "logs" / "version_0"), **train_losses(root / "logs" / "version_1")}
        done[strategy] = {
            "losses": losses,
            "first": ckpt,
            "resumed": root / "logs" / "version_1" / "checkpoints" / "last.ckpt",
            "resumed_steps": sorted(train_losses(root / "logs" / "version_1")),
        }
        return done[strategy]

    return run


@pytest.mark.slow
@pytest.mark.parametrize("strategy", PRESETS)
def test_preset_trains_checkpoints_and_resumes(run_preset: Callable[[str], dict], strategy: str) -> None:
    result = run_preset(strategy)
    # the resumed run continued at step 2 instead of starting over, and reached step 4
    assert result["resumed_steps"] == [2, 3], result["resumed_steps"]
    assert sorted(result["losses"]) == [0, 1, 2, 3]
    assert all(torch.isfinite(torch.tensor(v)) for v in result["losses"].values())
    assert result["resumed"].exists()


@pytest.mark.slow
@pytest.mark.parametrize("strategy", [p for p in PRESETS if p != "ddp"])
def test_preset_follows_the_ddp_trajectory(run_preset: Callable[[str], dict], strategy: str) -> None:
    """Every layout starts from the same weights for the same seed (fsdp2 builds on the meta device
    and initialises its shards from the same random stream; ZeRO and EP build whole), sees the same
    data and makes the same float32 updates, so it follows plain DDP's losses step by step, across
    the checkpoint/resume in the middle (which round-trips sharded weights and AdamW moments)."""
    ddp, other = run_preset("ddp")["losses"], run_preset(strategy)["losses"]
    assert sorted(other) == sorted(ddp) == [0, 1, 2, 3]
    for step in ddp:
        assert other[step] == pytest.approx(ddp[step], rel=1e-5, abs=1e-5), (step, other, ddp)
    assert ddp[3] != ddp[0]  # the model did train: equal trajectories are not both frozen


def test_ep_checkpoint_holds_every_expert_and_its_optimizer_state(run_preset: Callable[[str], dict]) -> None:
    """A checkpoint written under EP has the layout of one written without it: [E, ...] experts."""
    ckpt = torch.load(run_preset("ep2_ddp")["first"], map_location="cpu", weights_only=False)
    reference = torch.load(run_preset("ddp")["first"], map_location="cpu", weights_only=False)
    experts = [k for k in ckpt["state_dict"] if k.endswith(("experts.w1", "experts.w2", "experts.w3"))]
    assert len(experts) == 9  # 3 MoE layers x 3 stacked weights
    for key in experts:
        assert ckpt["state_dict"][key].shape == reference["state_dict"][key].shape
        assert ckpt["state_dict"][key].shape[0] == 8
    for index, state in reference["optimizer_states"][0]["state"].items():
        assert ckpt["optimizer_states"][0]["state"][index]["exp_avg"].shape == state["exp_avg"].shape


def evaluate(command: str, strategy: str, ckpt: Path, root: Path, cache: Path) -> dict[str, float]:
    """``moeframe validate|test`` of a checkpoint under ``strategy`` on 2 processes; the logged metrics."""
    cmd = [
        sys.executable,
        "-m",
        "moeframe.cli",
        command,
        "-c",
        str(CONFIG),
        "--trainer.strategy",
        strategy,
        "--trainer.default_root_dir",
        str(root),
        "--trainer.limit_val_batches",
        "3",
        "--trainer.limit_test_batches",
        "3",
        "--trainer.enable_progress_bar",
        "false",
        "--data.init_args.seq_len",
        "32",
        "--data.init_args.batch_size",
        "4",
        "--data.init_args.max_bytes",
        "300000",
        "--ckpt_path",
        str(ckpt),
    ]
    run = subprocess.run(
        cmd,
        env=helpers.clean_env(MOEFRAME_CACHE=str(cache)),
        cwd=root.parent,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    with open(root / "logs" / "version_0" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    return {k: float(v) for row in rows for k, v in row.items() if v and k.startswith(("val/", "test/"))}


@pytest.mark.slow
def test_validate_and_test_under_zero3_match_ddp(
    run_preset: Callable[[str], dict], tmp_path_factory: pytest.TempPathFactory
) -> None:
    """A ZeRO-3 checkpoint (a DeepSpeed folder of partitioned states) evaluates through
    ``moeframe validate`` and ``moeframe test`` with the zero3 preset, and gives the loss DDP gives on
    its own checkpoint of the same step (same trajectory, so the same weights)."""
    cache = tmp_path_factory.mktemp("eval-cache")
    reference = evaluate("validate", "ddp", run_preset("ddp")["first"], tmp_path_factory.mktemp("v-ddp") / "run", cache)
    zero3_ckpt = run_preset("zero3")["first"]
    assert zero3_ckpt.is_dir()  # DeepSpeed's layout, not a single file
    validated = evaluate("validate", "zero3", zero3_ckpt, tmp_path_factory.mktemp("v-z3") / "run", cache)
    tested = evaluate("test", "zero3", zero3_ckpt, tmp_path_factory.mktemp("t-z3") / "run", cache)
    assert validated["val/loss"] == pytest.approx(reference["val/loss"], rel=1e-5)
    # test runs the same held-out batches; its per-batch mean equals the token-weighted mean here
    # because every batch has the same number of tokens
    assert tested["test/loss"] == pytest.approx(reference["val/loss"], rel=1e-5)
