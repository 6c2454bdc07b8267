"""One rank of the pipeline tests (``tests/test_pipeline.py`` starts WORLD of them, torchrun-style:
LOCAL_RANK/WORLD_SIZE/MASTER_* in the environment, so Lightning launches nothing itself and one
process group serves several trainings in a row).

``python tests/_pp_worker.py OUT.json JOB.json``: JOB lists runs ``{"name", "strategy": {...},
"steps", "resume_from_step"?}``; rank 0 writes ``{name: {"losses": [...], "ckpt": path}}``.
"""

from __future__ import annotations

import json
import os
import sys
from datetime import timedelta
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _pp_common import data_module, pretrain_module, trainer_settings  # noqa: E402

from moeframe import registry  # noqa: E402


class Losses(Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def run(root: Path, job: dict, world: int) -> dict:
    pp_cls = registry.load("strategy", "pp")
    strategy = pp_cls(timeout=timedelta(seconds=120), **job["strategy"])
    losses = Losses()
    save = ModelCheckpoint(
        dirpath=root / job["name"],
        every_n_train_steps=1,
        save_top_k=-1,
        filename="step{step}",
        auto_insert_metric_name=False,
    )
    trainer = L.Trainer(
        devices=world,
        strategy=strategy,
        max_steps=job["steps"],
        callbacks=[losses, save],
        default_root_dir=root,
        **{**trainer_settings(), **job.get("trainer", {})},
    )
    ckpt = None
    if "resume_from_step" in job:
        ckpt = str(root / job["resume_name"] / f"step{job['resume_from_step']}.ckpt")
    trainer.fit(pretrain_module(), data_module(job.get("batch_size", 4)), ckpt_path=ckpt)
    params = {n: p.detach().clone() for n, p in trainer.lightning_module.named_parameters()}
    torch.save(params, root / f"{job['name']}.rank{trainer.global_rank}.params.pt")
    return {"losses": losses.losses, "ckpt": str(root / job["name"] / f"step{job['steps']}.ckpt")}


def main() -> None:
    out, jobs = Path(sys.argv[1]), json.loads(Path(sys.argv[2]).read_text())
    world = int(os.environ["WORLD_SIZE"])
    results = {job["name"]: run(out.parent, job, world) for job in jobs}
    rank = int(os.environ["LOCAL_RANK"])
    out.with_suffix(f".rank{rank}.json").write_text(json.dumps(results))
    if rank == 0:
        out.write_text(json.dumps(results))


if __name__ == "__main__":
    main()
