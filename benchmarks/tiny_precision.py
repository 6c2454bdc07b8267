"""Where the time of the default tiny run goes, per precision (issue 23).

Runs ``moeframe fit -c configs/pretrain/tiny.yaml`` (fewer steps by default) once per precision in
fresh processes, alternating the precisions round by round so that a shared machine slows them
alike, and prints per phase the wall-clock seconds and the CPU seconds the process used
(``time.process_time``: all threads; OpenMP workers that spin while waiting count too):

- ``start-up``: process start to the first training hook (imports, config, data check, model build,
  the per-machine GEMM peak when not yet cached);
- ``fwd+bwd``: a training batch's start to ``on_before_optimizer_step`` (forward, loss, backward);
- ``optimizer``: from there to the batch's end (gradient clipping, AdamW, zero_grad);
- ``validation``: every validation loop, the sanity check included;
- ``checkpoint``: every ``trainer.save_checkpoint``;
- ``between steps``: the rest of the time between two training batches (data loading, the other
  callbacks, logging), validation and checkpoints taken out;
- ``whole run``: process start to exit.

    python benchmarks/tiny_precision.py [--steps 100] [--threads 2] [--rounds 1] \
        [--precisions 32-true bf16-mixed] [-- extra moeframe fit args]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PHASES = ("start-up", "fwd+bwd", "optimizer", "validation", "checkpoint", "between steps", "whole run")


def _clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def _child(args: argparse.Namespace, extra: list[str]) -> None:
    """One fit in this process; prints the phase totals as one JSON line."""
    born = _clock()
    import torch

    torch.set_num_threads(args.threads)
    from lightning.pytorch.callbacks import Callback

    from moeframe.commands.train import build_cli

    totals: dict[str, list[float]] = {p: [0.0, 0.0] for p in (*PHASES, "in gap")}
    marks: dict[str, tuple[float, float]] = {}
    step_cpu: list[float] = []  # CPU seconds of each step's forward + backward (warm-up shows here)
    step_wall: list[float] = []

    def add(phase: str, since: tuple[float, float]) -> None:
        now = _clock()
        totals[phase][0] += now[0] - since[0]
        totals[phase][1] += now[1] - since[1]

    class PhaseClock(Callback):
        def on_train_batch_start(self, trainer: Any, module: Any, batch: Any, batch_idx: int) -> None:
            if "end" in marks:
                add("between steps", marks.pop("end"))
            elif "start-up" not in marks:
                marks["start-up"] = born
                add("start-up", born)
            marks["batch"] = _clock()

        def on_before_optimizer_step(self, trainer: Any, module: Any, optimizer: Any) -> None:
            add("fwd+bwd", marks["batch"])
            step_cpu.append(round(time.process_time() - marks["batch"][1], 3))
            step_wall.append(round(time.perf_counter() - marks["batch"][0], 3))
            marks["opt"] = _clock()

        def on_train_batch_end(self, trainer: Any, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            add("optimizer", marks.pop("opt"))
            marks["end"] = _clock()

        def on_train_end(self, trainer: Any, module: Any) -> None:
            if "end" in marks:  # the last validation and checkpoints ran after the last batch
                add("between steps", marks.pop("end"))

        def on_validation_start(self, trainer: Any, module: Any) -> None:
            marks["val"] = _clock()

        def on_validation_end(self, trainer: Any, module: Any) -> None:
            add("validation", marks["val"])
            if "end" in marks:  # inside the gap between two batches: not part of "between steps"
                add("in gap", marks["val"])
            del marks["val"]

    cli = build_cli(
        args=[
            "-c",
            str(REPO / "configs" / "pretrain" / "tiny.yaml"),
            "--trainer.max_steps",
            str(args.steps),
            "--trainer.precision",
            args.precision,
            "--trainer.enable_progress_bar",
            "false",
            "--trainer.default_root_dir",
            args.root,
            *extra,
        ],
        run=False,
    )
    trainer = cli.trainer
    trainer.callbacks.insert(0, PhaseClock())
    save = trainer.save_checkpoint

    def timed_save(*a: Any, **k: Any) -> Any:
        since = _clock()
        try:
            return save(*a, **k)
        finally:
            add("checkpoint", since)
            if "end" in marks and "val" not in marks:
                add("in gap", since)

    trainer.save_checkpoint = timed_save  # type: ignore[method-assign]
    trainer.fit(cli.model, datamodule=cli.datamodule)
    add("whole run", born)
    val = _validation_losses(Path(trainer.logger.log_dir) / "metrics.csv")
    print(
        "PHASES "
        + json.dumps(
            {"totals": totals, "steps": trainer.global_step, "step_cpu": step_cpu, "step_wall": step_wall, "val": val}
        )
    )


def _validation_losses(metrics: Path) -> dict[str, float]:
    """``{step: val/loss}`` of a run's metrics.csv."""
    import csv

    rows = list(csv.DictReader(metrics.open()))
    return {r["step"]: round(float(r["val/loss"]), 3) for r in rows if r.get("val/loss")}


def _run_one(precision: str, args: argparse.Namespace, extra: list[str]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as root:
        cmd = [
            sys.executable,
            __file__,
            "--child",
            "--precision",
            precision,
            "--steps",
            str(args.steps),
            "--threads",
            str(args.threads),
            "--root",
            root,
            "--",
            *extra,
        ]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, check=False)
        line = next((x for x in out.stdout.splitlines() if x.startswith("PHASES ")), None)
        if line is None:
            raise SystemExit(f"{precision} run failed:\n{out.stderr[-3000:]}")
        return json.loads(line.removeprefix("PHASES "))


def _between_steps_alone(totals: dict[str, list[float]]) -> None:
    # validation and checkpoints that ran inside the gap between two batches: taken out of it
    in_gap = totals.pop("in gap")
    for i in (0, 1):
        totals["between steps"][i] -= in_gap[i]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--precisions", nargs="+", default=["32-true", "bf16-mixed"])
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--precision", help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    args, extra = parser.parse_known_args()
    extra = [x for x in extra if x != "--"]
    if args.child:
        _child(args, extra)
        return
    runs: dict[str, list[dict[str, Any]]] = {p: [] for p in args.precisions}
    for _ in range(args.rounds):
        for precision in args.precisions:
            result = _run_one(precision, args, extra)
            _between_steps_alone(result["totals"])
            runs[precision].append(result)
            for clock in ("cpu", "wall"):
                seconds = result[f"step_{clock}"]
                half = sorted(seconds[len(seconds) // 2 :])
                print(
                    f"{precision}: fwd+bwd {clock} s, first 5 steps {seconds[:5]}, median of the second half {half[len(half) // 2]}"
                )
            print(f"{precision}: validation loss by step {result['val']}", flush=True)
    print(f"{args.steps} steps, {args.threads} threads, {args.rounds} round(s); seconds wall / CPU (sum over rounds)")
    print("| phase | " + " | ".join(f"`{p}` wall | CPU" for p in args.precisions) + " |")
    print("|---|" + "---:|---:|" * len(args.precisions))
    for phase in PHASES:
        cells = []
        for p in args.precisions:
            wall = sum(r["totals"][phase][0] for r in runs[p])
            cpu = sum(r["totals"][phase][1] for r in runs[p])
            cells.append(f"{wall:.1f} | {cpu:.1f}")
        print(f"| {phase} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
