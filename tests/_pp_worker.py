"""One rank of the pipeline tests (``tests/test_pipeline.py`` starts WORLD of them, torchrun-style:
LOCAL_RANK/WORLD_SIZE/MASTER_* in the environment, so Lightning launches nothing itself and one
process group serves several trainings in a row).

``python tests/_pp_worker.py OUT.json JOB.json``: JOB lists runs ``{"name", "strategy": {...},
"steps", "checkpoints"?, "resume_from_step"? or "ckpt_path"?, "val_permille"?, "evaluate"?}``; rank 0 writes ``{name: {"losses":
[...], "ckpt": path, "throughput": [[tokens, flops] per step], "val": {...}?, "validate", "test"?}}``
(``checkpoints``: a checkpoint per step, ``step{N}.ckpt``, else none; ``evaluate``: after the fit, ``validate``, ``test`` and ``predict`` on a new trainer; ``predict``:
``predict`` on the fit's trainer; each rank saves its predictions).
"""

from __future__ import annotations

import json
import os
import sys
import time
import weakref
from datetime import timedelta
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _pp_common import data_module, pretrain_module, trainer_settings  # noqa: E402

from moeframe import registry  # noqa: E402
from moeframe.training.throughput import ModelThroughput  # noqa: E402


class Losses(Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


class SetupPeakBytes(Callback):
    """The most bytes of CPU tensor storage alive at once from ``configure_model`` to the end of the
    strategy's setup (``setup_peak_bytes``), and what the module holds when training starts
    (``held_bytes``): every storage an op creates is counted until it is freed."""

    def __init__(self) -> None:
        self.live = self.peak = self.held = 0
        self.mode: TorchDispatchMode | None = None

    def setup(self, trainer, pl_module, stage) -> None:  # before configure_model
        self.mode = _CountStorage(self)
        self.mode.__enter__()

    def on_fit_start(self, trainer, pl_module) -> None:  # after the strategy's setup
        self.mode.__exit__(None, None, None)
        tensors = {t.untyped_storage().data_ptr(): t for t in (*pl_module.parameters(), *pl_module.buffers())}
        self.held = sum(t.untyped_storage().nbytes() for t in tensors.values())


class _CountStorage(TorchDispatchMode):
    def __init__(self, counter: SetupPeakBytes) -> None:
        super().__init__()
        self.counter, self.seen = counter, set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                storage = t.untyped_storage()
                if storage.data_ptr() not in self.seen and storage.nbytes():
                    self.seen.add(storage.data_ptr())
                    self.counter.live += storage.nbytes()
                    self.counter.peak = max(self.counter.peak, self.counter.live)
                    weakref.finalize(storage, self._freed, storage.data_ptr(), storage.nbytes())
        return out

    def _freed(self, ptr: int, nbytes: int) -> None:
        self.seen.discard(ptr)
        self.counter.live -= nbytes


def run(root: Path, job: dict, world: int) -> dict:
    start = time.perf_counter()
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
    throughput = ModelThroughput(peak_flops=1e12)  # a given peak: no GEMM measurement
    memory = [SetupPeakBytes()] if job.get("count_setup_bytes") else []
    # only jobs whose checkpoints a test reads save them (one save per step per rank: ~1 s a job)
    saves = [save] if job.get("checkpoints") else []
    trainer = L.Trainer(
        devices=world,
        strategy=strategy,
        max_steps=job["steps"],
        callbacks=[losses, *saves, throughput, *memory],
        default_root_dir=root,
        enable_checkpointing=bool(saves),
        **{**trainer_settings(), **job.get("trainer", {})},
    )
    ckpt = job.get("ckpt_path")  # a checkpoint of another layout (e.g. single-process)
    if "resume_from_step" in job:
        ckpt = str(root / job["resume_name"] / f"step{job['resume_from_step']}.ckpt")
    data = data_module(job.get("batch_size", 4), job.get("val_permille", 0))
    trainer.fit(pretrain_module(**job.get("model", {})), data, ckpt_path=ckpt)
    params = {n: p.detach().clone() for n, p in trainer.lightning_module.named_parameters()}
    torch.save(params, root / f"{job['name']}.rank{trainer.global_rank}.params.pt")
    result = {
        "losses": losses.losses,
        "ckpt": str(root / job["name"] / f"step{job['steps']}.ckpt"),
        "throughput": [[tokens, flops] for _, tokens, flops in throughput._steps],
        "optimized_numel": sum(p.numel() for g in trainer.optimizers[0].param_groups for p in g["params"]),
    }
    if memory:
        result.update(setup_peak_bytes=memory[0].peak, held_bytes=memory[0].held)
    if job.get("val_permille"):
        result["val"] = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    if job.get("predict"):  # on the fitted trainer, over a held-out split of its own
        held_out = data_module(job.get("batch_size", 4), val_permille=100)
        predictions = torch.cat(trainer.predict(trainer.lightning_module, held_out))
        torch.save(predictions, root / f"{job['name']}.rank{trainer.global_rank}.predictions.pt")
    if job.get("evaluate"):
        result.update(evaluate(root, job, world, data, result["ckpt"]))
    result["seconds"] = time.perf_counter() - start  # what a job costs the launch (test-time budgeting)
    return result


def evaluate(root: Path, job: dict, world: int, data, ckpt: str) -> dict:
    """``moeframe validate|test|predict --ckpt_path`` of the run: a new trainer, module and strategy."""
    strategy = registry.load("strategy", "pp")(timeout=timedelta(seconds=120), **job["strategy"])
    settings = {**trainer_settings(), **job.get("trainer", {})}
    trainer = L.Trainer(devices=world, strategy=strategy, default_root_dir=root / "evaluate", **settings)
    module = pretrain_module()
    validated = trainer.validate(module, data, ckpt_path=ckpt, verbose=False)[0]
    tested = trainer.test(module, data, ckpt_path=ckpt, verbose=False)[0]
    predictions = torch.cat(trainer.predict(module, data, ckpt_path=ckpt))
    torch.save(predictions, root / f"{job['name']}.rank{trainer.global_rank}.predictions.pt")
    return {"validate": validated, "test": tested}


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
