"""Driven by tests/test_data_streaming.py in a subprocess: train, record each step's batch hash.

usage: resume_script.py DATA_DIR OUT_JSON MAX_STEPS DEVICES WORKERS CKPT_IN|- [SAVE_EVERY CKPT_DIR]
"""

from __future__ import annotations

import hashlib
import json
import sys
from datetime import timedelta

import lightning as L
from lightning.pytorch.strategies import DDPStrategy

from moeframe.config import OptimConfig
from moeframe.data.shards import PretrainDataModule
from moeframe.testing import tiny_config
from moeframe.training.pretrain import PretrainModule


class RecordBatches(L.Callback):
    def __init__(self) -> None:
        self.seen: list[tuple[int, str]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        digest = hashlib.sha256(batch["input_ids"].numpy().tobytes()).hexdigest()[:16]
        self.seen.append((trainer.global_step, digest))


def main() -> None:
    data, out, max_steps, devices, workers = (
        sys.argv[1],
        sys.argv[2],
        int(sys.argv[3]),
        int(sys.argv[4]),
        int(sys.argv[5]),
    )
    ckpt_in = sys.argv[6] if len(sys.argv) > 6 and sys.argv[6] != "-" else None
    save_every, ckpt_dir = (int(sys.argv[7]), sys.argv[8]) if len(sys.argv) > 8 else (0, None)
    L.seed_everything(0)
    model = PretrainModule(tiny_config(vocab_size=260, n_layers=1, first_k_dense=0), OptimConfig(warmup_steps=2))
    dm = PretrainDataModule(path=data, seq_len=16, batch_size=4, num_workers=workers, seed=7)
    recorder = RecordBatches()
    callbacks: list[L.Callback] = [recorder]
    if save_every:  # checkpoints mid-run, as a preempted job would leave them
        callbacks.append(
            L.pytorch.callbacks.ModelCheckpoint(
                dirpath=ckpt_dir,
                filename="step{step}",
                auto_insert_metric_name=False,
                every_n_train_steps=save_every,
                save_top_k=-1,
            )
        )
    strategy = DDPStrategy(timeout=timedelta(seconds=60)) if devices > 1 else "auto"
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=bool(save_every),
        enable_progress_bar=False,
        limit_val_batches=0,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    trainer.fit(model, dm, ckpt_path=ckpt_in)
    with open(f"{out}.rank{trainer.global_rank}.json", "w") as f:
        json.dump({"seen": recorder.seen, "epoch": dm.epoch, "consumed": dm.consumed}, f)


if __name__ == "__main__":
    main()
