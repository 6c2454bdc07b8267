"""Optimizers on tiny-v4, the same steps, data and seed (issue 22).

Runs ``moeframe fit -c configs/pretrain/tiny-v4.yaml`` once per variant in this process (everything
else equal: lr 3e-3 with 10 warm-up steps then cosine, weight decay 0.1, seq 64, batch 8 unless
--batch) and prints the mean train loss of the last 10 steps, the validation loss at the end and the
time per step. Variants: ``adamw``; ``muon`` (Jordan's 5 Newton-Schulz iterations, update RMS 0.2,
moeframe's first Muon); ``muon-v4`` (DeepSeek-V4's hybrid 8 + 2 iterations, update RMS 0.18, what
tiny-v4.yaml sets). Usage:

    python benchmarks/v4_muon.py [--steps 60] [--batch 8] [--variants adamw muon muon-v4] [--seed 1234] [--out DIR]
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

from moeframe.cli import main

REPO = Path(__file__).resolve().parents[1]
OPTIM = "--model.init_args.optim."
VARIANTS = {
    "adamw": {"optimizer": "adamw"},
    "muon": {"optimizer": "muon", "muon_ns_schedule": "jordan", "muon_update_rms": "0.2"},
    "muon-v4": {"optimizer": "muon", "muon_ns_schedule": "hybrid", "muon_update_rms": "0.18"},
}


def run(variant: str, steps: int, batch: int, root: Path, seed: int = 1234) -> dict[str, float]:
    optim = [a for key, value in VARIANTS[variant].items() for a in (OPTIM + key, value)]
    args = [
        "fit",
        "-c",
        str(REPO / "configs/pretrain/tiny-v4.yaml"),
        "--trainer.default_root_dir",
        str(root),
        "--seed_everything",
        str(seed),
        *optim,
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
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=["adamw", "muon", "muon-v4"])
    parser.add_argument("--seed", type=int, default=1234, help="the config's seed_everything")
    parser.add_argument("--out", default="runs/bench-v4-muon")
    a = parser.parse_args()
    results = {v: run(v, a.steps, a.batch, Path(a.out) / v, a.seed) for v in a.variants}
    print("| optimizer | first train loss | train loss, mean of last 10 steps | val loss | s/step (incl. setup) |")
    print("|---|---:|---:|---:|---:|")
    for opt, r in results.items():
        print(f"| {opt} | {r['train_first']:.4f} | {r['train_last10']:.4f} | {r['val']:.4f} | {r['s_per_step']:.2f} |")


if __name__ == "__main__":
    cli()
