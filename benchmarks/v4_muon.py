"""Muon versus AdamW on tiny-v4, the same steps, data and seed (issue 22).

Runs ``moeframe fit -c configs/pretrain/tiny-v4.yaml`` twice in this process, once with
``optim.optimizer: adamw`` and once with ``muon`` (everything else equal: lr 3e-3 with 10 warm-up
steps then cosine, weight decay 0.1, seq 64, batch 8 unless --batch), and prints the mean train loss of the last
10 steps, the validation loss at the end and the time per step. Usage:

    python benchmarks/v4_muon.py [--steps 60] [--batch 8] [--out runs/bench-v4-muon]
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

from moeframe.cli import main

REPO = Path(__file__).resolve().parents[1]


def run(optimizer: str, steps: int, batch: int, root: Path) -> dict[str, float]:
    args = [
        "fit",
        "-c",
        str(REPO / "configs/pretrain/tiny-v4.yaml"),
        "--trainer.default_root_dir",
        str(root),
        "--model.init_args.optim.optimizer",
        optimizer,
        "--model.init_args.optim.warmup_steps",
        "10",
        "--data.init_args.seq_len",
        "64",
        "--data.init_args.batch_size",
        str(batch),
        "--data.init_args.max_bytes",
        "1000000",
        "--trainer.max_steps",
        str(steps),
        "--trainer.val_check_interval",
        str(steps),
        "--trainer.limit_val_batches",
        "8",
        "--trainer.num_sanity_val_steps",
        "0",
        "--trainer.log_every_n_steps",
        "1",
    ]
    start = time.perf_counter()
    assert main(args) == 0
    elapsed = time.perf_counter() - start
    rows = list(csv.DictReader(next(root.rglob("metrics.csv")).open()))
    train = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    val = [float(r["val/loss"]) for r in rows if r.get("val/loss")]
    return {
        "train_last10": sum(train[-10:]) / len(train[-10:]),
        "train_first": train[0],
        "val": val[-1],
        "s_per_step": elapsed / steps,
    }


def cli() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--out", default="runs/bench-v4-muon")
    a = parser.parse_args()
    results = {opt: run(opt, a.steps, a.batch, Path(a.out) / opt) for opt in ("adamw", "muon")}
    print("| optimizer | first train loss | train loss, mean of last 10 steps | val loss | s/step (incl. setup) |")
    print("|---|---:|---:|---:|---:|")
    for opt, r in results.items():
        print(f"| {opt} | {r['train_first']:.4f} | {r['train_last10']:.4f} | {r['val']:.4f} | {r['s_per_step']:.2f} |")


if __name__ == "__main__":
    cli()
