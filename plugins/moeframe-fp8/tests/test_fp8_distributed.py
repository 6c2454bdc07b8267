"""``fp8`` on 2 CPU processes (gloo) through ``moeframe fit``: DDP, expert parallelism (``ep``: each
rank holds half the routed experts, still in FP8) and DeepSpeed ZeRO-1/2/3 (the moeframe-parallel
presets, BF16 engine with DeepSpeed's fp32 master weights) train with the FP8 Linears and FP8
routed experts, the loss finite and falling; a ZeRO-3 checkpoint (sharded, with the Adam moments in
BF16: option ``bf16_moments``) resumes.

Each case is a real run of the command line in a subprocess with a clean environment and a
timeout (the parallel plugin's helpers). 3 optimizer steps; ZeRO-3 then resumes to step 5.
"""

from __future__ import annotations

import csv
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moeframe.testing import TINY_RUN_FLAGS

_PARALLEL_TESTS = Path(__file__).resolve().parents[2] / "moeframe-parallel" / "tests"
_spec = importlib.util.spec_from_file_location("_ptest_helpers_fp8", _PARALLEL_TESTS / "_helpers.py")
helpers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(helpers)

CONFIG = helpers.REPO / "configs" / "pretrain" / "tiny-parallel.yaml"


def fit(
    root: Path, strategy: str, plugins: str, max_steps: int, cache: Path, ckpt: Path | None = None
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
        "--trainer.plugins",
        plugins,
        "--trainer.max_steps",
        str(max_steps),
        "--trainer.default_root_dir",
        str(root),
        *TINY_RUN_FLAGS,
    ]
    if ckpt is not None:
        cmd += ["--ckpt_path", str(ckpt)]
    return subprocess.run(
        cmd,
        env=helpers.clean_env(MOEFRAME_CACHE=str(cache), MASTER_PORT=str(helpers.free_port())),
        cwd=root.parent,
        capture_output=True,
        text=True,
        timeout=420,
    )


def train_losses(version_dir: Path) -> dict[int, float]:
    with open(version_dir / "metrics.csv") as f:
        return {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")}


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fp8-data-cache")


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "ep", "zero1", "zero2", "zero3"])
def test_fp8_trains_on_two_processes(strategy: str, cache: Path, tmp_path: Path) -> None:
    root = tmp_path / "run"
    # ZeRO-3 also keeps its Adam moments in BF16: DeepSpeed steps the wrapped torch AdamW, whose
    # step hooks do the casting, and the moments travel through the sharded checkpoint
    plugins = "{class_path: fp8, init_args: {bf16_moments: true}}" if strategy == "zero3" else "fp8"
    run = fit(root, strategy, plugins, 3, cache)
    assert run.returncode == 0, run.stderr[-4000:]
    output = run.stdout + run.stderr
    engine = "DeepSpeed bf16 engine" if strategy.startswith("zero") else "bf16 autocast"
    # under ep the experts are already EPExperts shards when fp8 converts: still 3 modules
    assert (
        f"fp8: 28 Linear layers and 3 routed-expert modules run their GEMMs in FP8 E4M3 (backend emulated, "
        f"scale fp32, {engine}"
    ) in output
    if strategy.startswith("zero"):
        assert "Enabling DeepSpeed BF16" in output
    losses = train_losses(root / "logs" / "version_0")
    assert sorted(losses) == [0, 1, 2]
    assert all(loss == loss and loss < 10 for loss in losses.values()), losses  # finite
    assert losses[2] < losses[0], losses
    if strategy != "zero3":
        return
    # ZeRO-3 saves a sharded checkpoint folder (one shard per rank); resume from it
    ckpt = root / "logs" / "version_0" / "checkpoints" / "last.ckpt"
    shards = sorted(ckpt.rglob("*optim_states.pt"))
    assert ckpt.is_dir() and len(shards) == 2, "no sharded ZeRO-3 checkpoint (one optimizer shard per rank)"
    for shard in shards:
        state = torch.load(shard, map_location="cpu", weights_only=False)["optimizer_state_dict"]
        moments = [s[k] for s in state["optimizer_state_dict"]["state"].values() for k in ("exp_avg", "exp_avg_sq")]
        assert moments and all(m.dtype == torch.bfloat16 for m in moments), [m.dtype for m in moments]
    resumed = fit(root, strategy, plugins, 5, cache, ckpt=ckpt)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    after = train_losses(root / "logs" / "version_1")
    assert sorted(after) == [3, 4], after  # continued at step 3, not from scratch
    assert all(loss == loss for loss in after.values())
    assert after[4] < losses[0], (losses, after)
