"""Balance: DeepSeek-V3's aux-loss-free router versus the core top-k router with an auxiliary loss.

Trains the tiny MoE twice through the real Trainer on the embedded corpus, same seed, same data,
same steps: once with router ``topk`` (softmax, switch-style auxiliary loss, configs/model/tiny.yaml)
and once with router ``aux_free`` (sigmoid, bias balancing, configs/model/tiny-auxfree.yaml). The
``ExpertBalance`` callback logs MaxVio_batch every step; the script reports its mean over the last
steps, MaxVio_global over the validation set and the validation loss.

    python benchmarks/balance.py                # 400 steps each: ~8 minutes on 2 CPU cores
    python benchmarks/balance.py --routers aux_free --gamma 0.005   # try one setting alone

Target (issue 4): aux_free MaxVio_batch <= 0.25 and below the baseline's, validation loss no worse
than the baseline's + 1%.
"""

from __future__ import annotations

import argparse
import csv
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L
import yaml
from lightning.pytorch.loggers import CSVLogger

from moeframe.config import ModelConfig, OptimConfig
from moeframe.data.shards import PretrainDataModule
from moeframe.training.balance import ExpertBalance
from moeframe.training.pretrain import PretrainModule

REPO = Path(__file__).resolve().parents[1]
MODELS = {"topk": REPO / "configs/model/tiny.yaml", "aux_free": REPO / "configs/model/tiny-auxfree.yaml"}


def run(name: str, args: argparse.Namespace, data: PretrainDataModule, root: Path) -> dict[str, Any]:
    config = yaml.safe_load(MODELS[name].read_text())
    if name == "aux_free" and args.gamma is not None:
        config["router"]["bias_update_speed"] = args.gamma
    L.seed_everything(args.seed, verbose=False)
    module = PretrainModule(ModelConfig(**config), OptimConfig(lr=3e-3, warmup_steps=min(50, args.steps // 5)))
    balance = ExpertBalance(log_every_n_steps=1, heatmaps=True)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=args.steps,
        gradient_clip_val=1.0,
        val_check_interval=args.steps,
        limit_val_batches=args.val_batches,
        num_sanity_val_steps=0,
        logger=CSVLogger(root, name=name),
        callbacks=[balance],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    started = time.perf_counter()
    trainer.fit(module, data)
    seconds = time.perf_counter() - started
    (metrics_csv,) = root.glob(f"{name}/version_*/metrics.csv")
    with metrics_csv.open() as f:
        maxvio = [float(r["balance/maxvio_batch"]) for r in csv.DictReader(f) if r.get("balance/maxvio_batch")]
    last = maxvio[-args.last :]
    return {
        "router": name,
        "maxvio_batch": sum(last) / len(last),
        "maxvio_global": balance.last_metrics["balance/maxvio_global"],
        "val_loss": float(trainer.callback_metrics["val/loss"]),
        "seconds": seconds,
        "heatmap": str(balance.heatmap_paths[-1]) if balance.heatmap_paths else "-",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--last", type=int, default=50, help="average MaxVio_batch over this many final steps")
    parser.add_argument("--gamma", type=float, default=None, help="override the aux_free bias update speed")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--val-batches", type=int, default=16)
    parser.add_argument("--routers", nargs="+", default=["topk", "aux_free"], choices=sorted(MODELS))
    parser.add_argument("--out", type=Path, default=None, help="where logs and heatmaps go (default: a temp dir)")
    args = parser.parse_args()

    root = args.out or Path(tempfile.mkdtemp(prefix="moeframe-balance-"))
    data = PretrainDataModule(seq_len=256, batch_size=16, max_bytes=4_000_000)
    results = [run(name, args, data, root) for name in args.routers]

    print(
        f"\n{args.steps} steps x 16 x 256 byte tokens, seed {args.seed}; MaxVio_batch = mean of the last "
        f"{args.last} steps; validation on {args.val_batches} batches"
    )
    print(f"{'router':<10} {'MaxVio_batch':>12} {'MaxVio_global':>13} {'val loss':>9} {'time (s)':>9}")
    for r in results:
        print(
            f"{r['router']:<10} {r['maxvio_batch']:>12.3f} {r['maxvio_global']:>13.3f} {r['val_loss']:>9.4f} {r['seconds']:>9.0f}"
        )
    print(f"logs and heatmaps: {root}")
    if [r["router"] for r in results] != ["topk", "aux_free"]:
        return
    base, aux = results
    balanced = aux["maxvio_batch"] <= 0.25 and aux["maxvio_batch"] < base["maxvio_batch"]
    quality = aux["val_loss"] <= base["val_loss"] * 1.01
    print(
        f"aux_free MaxVio_batch <= 0.25 and below topk: {balanced}; "
        f"val loss within 1% of topk: {quality} ({100 * (aux['val_loss'] / base['val_loss'] - 1):+.2f}%)"
    )


if __name__ == "__main__":
    main()
