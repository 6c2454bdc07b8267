"""Soak test on the CPU: the tiny run killed with SIGTERM at random moments and restarted by a
wrapper loop with ``--ckpt_path last``, until it completes; then the same run uninterrupted; the
two must end in the same state, bit for bit (weights, optimizer, LR schedule, data position, RNG
states) and with the same logged loss at every step.

    python scripts/soak.py --minutes 30                 # ~30 min of preempted training, then the reference
    python scripts/soak.py --minutes 1 --kill-every 5 --small   # a quick check (what the test runs)

``--minutes`` sizes the run: a short calibration measures steps per second, and the step count is
chosen so that the uninterrupted run would take about that long (the preempted phase takes a
little longer, restarts cost seconds each; the reference takes about ``--minutes`` more). A kill
lands ``kill-every`` × U(0.5, 1.5) seconds after each restart has started training, anywhere in a
step, a checkpoint write or a validation.
Not part of CI. Exit status 0 when the final states are identical.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "pretrain" / "tiny.yaml"
SMALL = [
    "--data.init_args.seq_len",
    "32",
    "--data.init_args.batch_size",
    "4",
    "--data.init_args.max_bytes",
    "300000",
    "--trainer.limit_val_batches",
    "2",
    "--trainer.num_sanity_val_steps",
    "0",
]
_CLUSTER = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK")


def child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in _CLUSTER}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def fit_command(root: Path, steps: int, every: int, small: bool, extra: list[str]) -> list[str]:
    saver = {
        "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
        "init_args": {
            "dirpath": str(root / "checkpoints"),
            "filename": "step{step}",
            "auto_insert_metric_name": False,
            "every_n_train_steps": every,
            "save_top_k": -1,
            "save_last": True,
        },
    }
    return [
        sys.executable,
        "-m",
        "moeframe.cli",
        "fit",
        "-c",
        str(TINY),
        "--trainer.default_root_dir",
        str(root),
        "--trainer.max_steps",
        str(steps),
        "--trainer.val_check_interval",
        str(every),
        "--trainer.log_every_n_steps",
        "1",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.callbacks+",
        json.dumps(saver),
        *(SMALL if small else []),
        *extra,
    ]


def run_once(cmd: list[str], log: Path, kill_after: float | None) -> tuple[int, bool]:
    """Run ``cmd``; ``kill_after`` seconds after it has started training, send SIGTERM. Returns the
    exit status and whether the signal was sent."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=child_env())
    sent = threading.Event()
    timer: threading.Timer | None = None

    def kill() -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            sent.set()

    with open(log, "a") as out:
        assert proc.stdout is not None
        for line in proc.stdout:
            out.write(line)
            if kill_after is not None and timer is None and line.startswith("moeframe: training from step"):
                timer = threading.Timer(kill_after, kill)
                timer.start()
    code = proc.wait()
    if timer is not None:
        timer.cancel()
    return code, sent.is_set()


def final_step(root: Path) -> int:
    import torch

    last = root / "checkpoints" / "last.ckpt"
    if not last.exists():
        return 0
    return int(torch.load(last, map_location="cpu", weights_only=False)["global_step"])


def losses_by_step(root: Path) -> dict[int, set[str]]:
    """Every train/loss value logged for each step, over all versions (a restart from an older
    checkpoint logs some steps twice; an exact resume logs the same value)."""
    found: dict[int, set[str]] = {}
    for f in (root / "logs").glob("version_*/metrics.csv"):
        for row in csv.DictReader(f.open()):
            if row.get("train/loss"):
                found.setdefault(int(row["step"]), set()).add(row["train/loss"])
    return found


def compare(reference: Path, soaked: Path) -> list[str]:
    """Differences between the two final checkpoints and logged losses (empty: identical)."""
    import torch

    a, b = (
        torch.load(r / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False) for r in (reference, soaked)
    )
    problems: list[str] = []

    def same(x: Any, y: Any, where: str) -> None:
        if isinstance(x, torch.Tensor):
            if not (isinstance(y, torch.Tensor) and x.shape == y.shape and torch.equal(x, y)):
                problems.append(f"tensor {where} differs")
        elif isinstance(x, dict):
            if set(x) != set(y):
                problems.append(f"keys of {where} differ")
            for k in set(x) & set(y):
                same(x[k], y[k], f"{where}.{k}")
        elif isinstance(x, (list, tuple)):
            if len(x) != len(y):
                problems.append(f"length of {where} differs")
            for i, (p, q) in enumerate(zip(x, y)):
                same(p, q, f"{where}[{i}]")
        elif x != y:
            problems.append(f"{where}: {x!r} != {y!r}")

    for key in (
        "state_dict",
        "optimizer_states",
        "lr_schedulers",
        "global_step",
        "moeframe_tokens_seen",
        "PretrainDataModule",
    ):
        same(a[key], b[key], key)
    same(a["callbacks"]["moeframe.Reliability"]["rng"], b["callbacks"]["moeframe.Reliability"]["rng"], "rng")
    ref, soak = losses_by_step(reference), losses_by_step(soaked)
    for step, values in sorted(ref.items()):
        if soak.get(step) != values:
            problems.append(f"train/loss at step {step}: {sorted(soak.get(step, []))} vs {sorted(values)}")
    return problems


def calibrate(workdir: Path, small: bool, extra: list[str]) -> float:
    """Steps per second of a short run, start-up excluded as far as a wall clock can."""
    root, steps = workdir / "calibration", 40
    started = time.monotonic()
    run_once(fit_command(root, 10, 10, small, extra), workdir / "calibration.log", None)
    short = time.monotonic() - started
    started = time.monotonic()
    run_once(fit_command(workdir / "calibration2", steps + 10, 1000, small, extra), workdir / "calibration.log", None)
    return steps / max(time.monotonic() - started - short, 1e-3)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, required=True, help="about how long the preempted run trains")
    p.add_argument("--kill-every", type=float, default=180.0, help="mean seconds between SIGTERMs (default 180)")
    p.add_argument("--steps", type=int, default=None, help="run length in steps (default: from --minutes)")
    p.add_argument("--checkpoint-every", type=int, default=None, help="periodic checkpoints (default: steps/20)")
    p.add_argument("--small", action="store_true", help="short sequences and batches (the quick check)")
    p.add_argument("--seed", type=int, default=0, help="seed of the kill times")
    p.add_argument("--max-kills", type=int, default=None, help="stop killing after this many SIGTERMs")
    p.add_argument("--workdir", type=Path, default=REPO / "runs" / "soak")
    p.add_argument("extra", nargs="*", help="more `moeframe fit` arguments (after --)")
    args = p.parse_args(argv)
    rng = random.Random(args.seed)
    args.workdir.mkdir(parents=True, exist_ok=True)
    steps = args.steps or max(20, int(args.minutes * 60 * calibrate(args.workdir, args.small, args.extra)))
    every = args.checkpoint_every or max(1, steps // 20)
    steps = -(-steps // every) * every  # the last step is a checkpoint step of both runs
    soaked, reference = args.workdir / "preempted", args.workdir / "reference"
    print(f"soak: {steps} steps, checkpoints every {every}, SIGTERM every ~{args.kill_every:.0f} s", flush=True)

    started, restarts, kills = time.monotonic(), 0, 0
    while final_step(soaked) < steps:
        kill_after = args.kill_every * rng.uniform(0.5, 1.5)
        if args.max_kills is not None and kills >= args.max_kills:
            kill_after = None
        code, killed = run_once(
            [*fit_command(soaked, steps, every, args.small, args.extra), "--ckpt_path", "last"],
            args.workdir / "preempted.log",
            kill_after,
        )
        kills += killed
        restarts += 1
        print(
            f"soak: run {restarts} exited with {code}{' after SIGTERM' if killed else ''}; "
            f"at step {final_step(soaked)}/{steps} after {time.monotonic() - started:.0f} s",
            flush=True,
        )
        if code not in (0, -signal.SIGTERM) or restarts > 10 * (steps // every + 2):
            print("soak: the run failed; see preempted.log", flush=True)
            return 1
    soak_s = time.monotonic() - started
    started = time.monotonic()
    code, _ = run_once(
        fit_command(reference, steps, every, args.small, args.extra), args.workdir / "reference.log", None
    )
    if code != 0:
        print("soak: the reference run failed; see reference.log", flush=True)
        return 1
    problems = compare(reference, soaked)
    preemptions = sum(
        1
        for f in soaked.glob("logs/version_*/events.jsonl")
        for line in f.read_text().splitlines()
        if json.loads(line)["event"] == "preempted"
    )
    summary = {
        "steps": steps,
        "runs": restarts,
        "sigterms": kills,
        "preemption_checkpoints": preemptions,
        "preempted_s": round(soak_s),
        "reference_s": round(time.monotonic() - started),
        "identical": not problems,
    }
    print("soak: " + json.dumps(summary), flush=True)
    for line in problems[:20]:
        print(f"soak: DIFFERENT {line}", flush=True)
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
