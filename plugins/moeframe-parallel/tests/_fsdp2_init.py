"""One rank of the fsdp2 meta-device initialisation test: Lightning's Trainer on 2 CPU processes
(its own launcher starts rank 1 by re-running this script), the tiny V3 model (MLA, aux_free
router with its buffers, MTP), no training step. Writes what each rank built and holds.

usage: python _fsdp2_init.py OUT_DIR SEED
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import torch
from torch.distributed.tensor import DTensor

from moeframe.inspect import load_model_config
from moeframe.training.pretrain import PretrainModule
from moeframe_parallel.fsdp2 import FSDP2Strategy

REPO = Path(__file__).resolve().parents[3]


class Recorder(PretrainModule):
    def configure_model(self) -> None:
        super().configure_model()
        self.built_on = self.decoder.embed.weight.device.type


class Dump(L.Callback):
    def __init__(self, out: Path) -> None:
        self.out = out

    def on_fit_start(self, trainer: L.Trainer, module: Recorder) -> None:
        params = dict(module.decoder.named_parameters())
        local = {n: p.to_local().clone() for n, p in params.items() if isinstance(p, DTensor)}
        full = {n: p.full_tensor() if isinstance(p, DTensor) else p.detach().clone() for n, p in params.items()}
        buffers = {n: b.clone() for n, b in module.decoder.named_buffers()}
        torch.save(
            {"built_on": module.built_on, "local": local, "full": full, "buffers": buffers, "sharded": sorted(local)},
            self.out / f"rank{trainer.global_rank}.pt",
        )
        trainer.should_stop = True


def main(out: Path, seed: int) -> None:
    ids = torch.randint(0, 512, (4, 17), generator=torch.Generator().manual_seed(0))
    L.seed_everything(seed)
    module = Recorder(config=load_model_config(REPO / "configs/model/tiny-v3.yaml"))
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=FSDP2Strategy(),
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[Dump(out)],
    )
    data = torch.utils.data.DataLoader([{"input_ids": r[:-1], "labels": r[1:]} for r in ids], batch_size=2)
    trainer.fit(module, train_dataloaders=data)


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
