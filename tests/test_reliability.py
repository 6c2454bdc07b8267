"""Exact resume after preemption: SIGTERM mid-epoch -> checkpoint at the next step -> clean exit ->
``--ckpt_path last`` -> the same weights, optimizer state, LR schedule, router state, RNG states
of every rank, data position and logged losses as the run that was never interrupted, bit for bit.
Single process, 2-process DDP and 2-process DeepSpeed ZeRO-2, all through ``moeframe fit``.
"""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from moeframe.testing import TINY_RUN_FLAGS

from .conftest import REPO, clean_env

SCRIPT = REPO / "tests" / "reliability_script.py"
TINY = REPO / "configs" / "pretrain" / "tiny.yaml"


def fit_args(root: Path, steps: int, *extra: str) -> list[str]:
    return [
        "-c",
        str(TINY),
        "--trainer.default_root_dir",
        str(root),
        "--trainer.max_steps",
        str(steps),
        *TINY_RUN_FLAGS,
        "--trainer.enable_model_summary",
        "false",
        *extra,
    ]


def launch(hooks: dict[str, Any], args: list[str], cwd: Path, **env: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(SCRIPT), json.dumps(hooks), *args],
        cwd=cwd,
        env=clean_env(**env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish(proc: subprocess.Popen, timeout: int = 300) -> tuple[int, str]:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        raise AssertionError(f"timed out:\n{out[-4000:]}")
    return proc.returncode, out


def run(hooks: dict[str, Any], args: list[str], cwd: Path, timeout: int = 300, **env: str) -> tuple[int, str]:
    return finish(launch(hooks, args, cwd, **env), timeout)


def run_and_signal(
    hooks: dict[str, Any],
    args: list[str],
    cwd: Path,
    signum: int = signal.SIGTERM,
    timeout: int = 300,
    again_while_saving: Path | None = None,
) -> tuple[int, str]:
    """Start a run that pauses at ``hooks['pause_at']`` and signal it there (rank 0, the process a
    scheduler or ``kill`` would signal); with ``again_while_saving`` (a marker the checkpoint
    writer creates, slowed down by 2 s), signal it a second time while it saves."""
    ready = Path(hooks["ready"])
    if again_while_saving is not None:
        hooks = {**hooks, "slow_save_s": 2, "slow_save_marker": str(again_while_saving)}
    proc = launch(hooks, args, cwd)
    deadline = time.monotonic() + timeout
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            code, out = finish(proc, 10)
            raise AssertionError(f"the run never reached step {hooks['pause_at']} (exit {code}):\n{out[-4000:]}")
        time.sleep(0.1)
    proc.send_signal(signum)
    if again_while_saving is not None:
        while not again_while_saving.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert again_while_saving.exists(), "the preemption checkpoint was never written"
        proc.send_signal(signum)
    return finish(proc, timeout)


def logged_losses(root: Path) -> list[tuple[int, str]]:
    """(step, train/loss as written) of every version, in order: the string, so equality is exact."""
    rows = []
    for f in sorted((root / "logs").glob("version_*/metrics.csv"), key=lambda p: int(p.parent.name.split("_")[1])):
        rows += [(int(r["step"]), r["train/loss"]) for r in csv.DictReader(f.open()) if r.get("train/loss")]
    return rows


def assert_identical(a: Any, b: Any, where: str = "") -> None:
    """Bit-for-bit equality of nested checkpoint content (tensors, arrays, containers, scalars)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a.view(torch.uint8) if a.dtype == torch.bool else a, b), f"tensor differs at {where}"
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, b), f"array differs at {where}"
    elif isinstance(a, dict):
        assert set(a) == set(b), f"keys differ at {where}: {set(a) ^ set(b)}"
        for k in a:
            assert_identical(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"length differs at {where}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}[{i}]")
    elif hasattr(a, "__dict__") and not isinstance(a, type):  # e.g. DeepSpeed's loss scaler: no __eq__
        assert type(a) is type(b), where
        assert_identical(vars(a), vars(b), where)
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


TRAINING_STATE = (
    "state_dict",
    "optimizer_states",
    "lr_schedulers",
    "global_step",
    "moeframe_tokens_seen",
    "PretrainDataModule",
)


def compare_file_checkpoints(a: Path, b: Path) -> None:
    ca, cb = (torch.load(p, map_location="cpu", weights_only=False) for p in (a, b))
    for key in TRAINING_STATE:
        assert_identical(ca[key], cb[key], key)
    # router state (the aux-free bias would live here) and the expert counts are part of state_dict;
    # RNG states of every rank at the end of training:
    assert_identical(
        ca["callbacks"]["moeframe.Reliability"]["rng"], cb["callbacks"]["moeframe.Reliability"]["rng"], "rng"
    )


def compare_deepspeed_checkpoints(a: Path, b: Path) -> None:
    files = sorted(p.relative_to(a) for p in (a / "checkpoint").glob("*.pt"))
    assert [f.name for f in files] == sorted(
        [
            "mp_rank_00_model_states.pt",
            "zero_pp_rank_0_mp_rank_00_optim_states.pt",
            "zero_pp_rank_1_mp_rank_00_optim_states.pt",
        ]
    ), files
    for name in files:
        ca, cb = (torch.load(root / name, map_location="cpu", weights_only=False) for root in (a, b))
        if "module" in ca:  # the module state, the client state Lightning keeps (LR schedule, data, RNG)
            for key in ("module", "lr_schedulers", "global_step", "moeframe_tokens_seen", "PretrainDataModule"):
                assert_identical(ca[key], cb[key], f"{name}:{key}")
            assert_identical(
                ca["callbacks"]["moeframe.Reliability"]["rng"], cb["callbacks"]["moeframe.Reliability"]["rng"], "rng"
            )
        else:  # this rank's fp32 master partition and Adam moments
            assert_identical(ca["optimizer_state_dict"], cb["optimizer_state_dict"], f"{name}:optimizer_state_dict")


STRATEGIES = {
    "single": [],
    "ddp": ["--trainer.devices", "2", "--trainer.strategy", "ddp"],
    "zero2": ["--trainer.devices", "2", "--trainer.strategy", "zero2"],
}


@pytest.mark.slow
@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_sigterm_mid_epoch_then_resume_equals_uninterrupted(strategy: str, tmp_path: Path) -> None:
    steps, pause = 7, 3
    extra = STRATEGIES[strategy]
    world = 2 if extra else 1
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    code, out = run(
        {"rng_log": str(whole / "rng"), "final": str(whole / "final.ckpt")}, fit_args(whole, steps, *extra), tmp_path
    )
    assert code == 0, out[-4000:]

    # interrupted: SIGTERM while step `pause` ends; the checkpoint follows at the next step boundary
    hooks = {
        "rng_log": str(cut / "rng"),
        "final": str(cut / "final.ckpt"),
        "pause_at": pause,
        "ready": str(tmp_path / "ready"),
    }
    # single process: a second SIGTERM arrives while the checkpoint is being written
    again = tmp_path / "saving" if strategy == "single" else None
    code, out = run_and_signal(hooks, fit_args(cut, steps, *extra), tmp_path, again_while_saving=again)
    assert code == 0, out[-4000:]  # a clean exit
    assert f"preempted by SIGTERM at step {pause + 1}" in out, out[-4000:]
    assert not (cut / "final.ckpt").exists()  # it really stopped early
    events = [json.loads(line) for line in (cut / "logs" / "version_0" / "events.jsonl").read_text().splitlines()]
    assert [(e["event"], e["step"]) for e in events] == [("preempted", pause + 1)]

    # the restart resumes from the newest checkpoint by itself
    hooks = {"rng_log": str(cut / "rng"), "final": str(cut / "final.ckpt")}
    code, out = run(hooks, [*fit_args(cut, steps, *extra), "--ckpt_path", "last"], tmp_path)
    assert code == 0, out[-4000:]
    assert "--ckpt_path last: resuming from" in out and "last.ckpt" in out, out[-4000:]

    if strategy == "zero2":
        compare_deepspeed_checkpoints(whole / "final.ckpt", cut / "final.ckpt")
    else:
        compare_file_checkpoints(whole / "final.ckpt", cut / "final.ckpt")
    losses = logged_losses(whole)
    assert len(losses) == steps and logged_losses(cut) == losses
    for rank in range(world):  # every rank's random stream continued exactly where it stopped
        name = f"rng/rank{rank}.jsonl"
        assert (cut / name).read_text() == (whole / name).read_text(), f"rank {rank} RNG draws differ"


@pytest.mark.slow
def test_soak_script_smoke(tmp_path: Path) -> None:
    """scripts/soak.py in its quick mode: a few random SIGTERMs over a short run, restarted by its
    wrapper loop, end in the same state as the uninterrupted run."""
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "soak.py"),
            "--minutes",
            "0",
            "--steps",
            "40",
            # the kill lands 0.25-0.75 s into training: well before the 40 steps end
            "--checkpoint-every",
            "10",
            "--kill-every",
            "0.5",
            "--max-kills",
            "1",
            "--small",
            "--workdir",
            str(tmp_path),
        ],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads(next(ln for ln in result.stdout.splitlines() if ln.startswith("soak: {"))[len("soak: ") :])
    assert summary["identical"] and summary["steps"] == 40
    assert summary["sigterms"] >= 1 and summary["runs"] >= 2, summary
