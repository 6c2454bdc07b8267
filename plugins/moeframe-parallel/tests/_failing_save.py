"""Test helper on PYTHONPATH: a callback that makes one checkpoint of a run impossible to write (an
unpicklable object in the client state), as a save that dies half way through."""

from __future__ import annotations

from typing import Any

import lightning as L


class FailSave(L.Callback):
    """The ``fail_at``-th checkpoint of the run cannot be written."""

    def __init__(self, fail_at: int = 2) -> None:
        self.fail_at, self.saves = fail_at, 0

    def on_save_checkpoint(self, trainer: L.Trainer, module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        self.saves += 1
        if self.saves == self.fail_at:
            checkpoint["cannot_be_pickled"] = lambda: None
