"""Driven by tests/test_reliability*.py and scripts/soak.py in subprocesses: ``moeframe fit`` (the
real CLI, with the callbacks moeframe adds by itself) plus one test callback, ``TestHooks``.

usage: reliability_script.py HOOKS_JSON [moeframe fit arguments ...]

HOOKS_JSON keys (all optional):
  pause_at / ready: at the end of that optimizer step, rank 0 writes the ``ready`` file and waits
      (up to 120 s) until the test has signalled it, so a signal lands mid-epoch at a known point;
  rng_log: a folder; every micro-batch each rank draws from torch, numpy and Python's random (as
      dropout would) and appends the draws to ``rank{r}.jsonl`` (rank r draws r extra values, so
      the ranks' streams differ);
  nan_at / nan_module: from step ``nan_at`` on, the output of module ``nan_module`` is multiplied
      by NaN (a test hook in one layer);
  fsize_limit_at / fsize_limit: after that step, the process may not write files larger than
      ``fsize_limit`` bytes (RLIMIT_FSIZE): a real EFBIG on the next checkpoint, as a full disk;
  final: save the final state there with ``trainer.save_checkpoint`` when training ends;
  delete_at / delete: after that step, delete folder ``delete`` (the data);
  truncate_at / truncate / truncate_to: after that step, cut file ``truncate`` (a shard) to
      ``truncate_to`` bytes, as a copy still in progress or someone else's ``truncate`` would.
  slow_save_s / slow_save_marker: every checkpoint save writes the marker file and waits that
      long between writing the new file and renaming it into place (``tests/slow_save.py``).
"""

from __future__ import annotations

import json
import os
import random
import resource
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


class TestHooks(L.Callback):
    def __init__(
        self,
        pause_at: int = 0,
        ready: str = "",
        rng_log: str = "",
        nan_at: int = 0,
        nan_module: str = "",
        fsize_limit_at: int = 0,
        fsize_limit: int = 0,
        final: str = "",
        delete_at: int = 0,
        delete: str = "",
        truncate_at: int = 0,
        truncate: str = "",
        truncate_to: int = 0,
    ) -> None:
        self.pause_at, self.ready, self.rng_log = pause_at, ready, rng_log
        self.nan_at, self.nan_module = nan_at, nan_module
        self.fsize_limit_at, self.fsize_limit, self.final = fsize_limit_at, fsize_limit, final
        self.delete_at, self.delete = delete_at, delete
        self.truncate_at, self.truncate, self.truncate_to = truncate_at, truncate, truncate_to

    @property
    def state_key(self) -> str:
        return "TestHooks"

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.nan_module:
            module = dict(pl_module.named_modules())[self.nan_module]

            def poison(_module: Any, _args: Any, output: Any) -> Any:
                if pl_module.trainer.global_step + 1 >= self.nan_at and isinstance(output, torch.Tensor):
                    return output * float("nan")
                return output

            module.register_forward_hook(poison)

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        if not self.rng_log:
            return
        rank = trainer.global_rank
        draws = {
            "step": trainer.global_step,
            "torch": torch.rand(2 + rank).tolist(),
            "numpy": np.random.rand(1 + rank).tolist(),
            "python": [random.random() for _ in range(1 + rank)],
        }
        Path(self.rng_log).mkdir(parents=True, exist_ok=True)
        with open(Path(self.rng_log) / f"rank{rank}.jsonl", "a") as f:
            f.write(json.dumps(draws) + "\n")

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if self.fsize_limit_at and step == self.fsize_limit_at:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
            resource.setrlimit(resource.RLIMIT_FSIZE, (self.fsize_limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
        if self.delete_at and step == self.delete_at and trainer.global_rank == 0:
            shutil.rmtree(self.delete)
        if self.truncate_at and step == self.truncate_at and trainer.global_rank == 0:
            os.truncate(self.truncate, self.truncate_to)
        if self.pause_at and step == self.pause_at and trainer.global_rank == 0:
            self._pause(trainer)

    def _pause(self, trainer: L.Trainer) -> None:
        from moeframe.training.reliability import Reliability

        guard = next(cb for cb in trainer.callbacks if isinstance(cb, Reliability))
        Path(self.ready).write_text(str(os.getpid()))
        deadline = time.monotonic() + 120
        while guard.signal_received is None and time.monotonic() < deadline:
            time.sleep(0.05)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.final:
            trainer.save_checkpoint(self.final)


def main() -> int:
    hooks = json.loads(sys.argv[1])
    if hooks.get("slow_save_s"):  # not a TestHooks option: patched into this process's saves
        import slow_save

        slow_save.install(float(hooks.pop("slow_save_s")), hooks.pop("slow_save_marker", ""))
    args = [
        "fit",
        *sys.argv[2:],
        "--trainer.callbacks+",
        json.dumps({"class_path": "reliability_script.TestHooks", "init_args": hooks}),
    ]
    from moeframe.cli import main as moeframe_main

    return moeframe_main(args)


if __name__ == "__main__":
    sys.exit(main())
