"""Atomic checkpoint folders for strategies that write a checkpoint as a folder of shards.

DeepSpeed and FSDP2 (torch.distributed.checkpoint) write every rank's part into the checkpoint
path itself, so a save that dies half way (preemption, disk full, a crash) leaves ``last.ckpt``
torn, and the good checkpoint it replaced is already gone. Here every rank writes into a hidden
temporary folder beside it; once all ranks are done, rank 0 swaps it in (``os.replace``; the old
folder is removed only after the new one is in place). A failed save removes its temporary folder
and leaves the previous checkpoint untouched. Before it saves, rank 0 removes the temporary folders
that saves killed earlier left in the same folder (their writer's pid is gone; see
``moeframe.training.reliability.remove_stale_partials``): each is a whole checkpoint's size.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from moeframe.plugin import partial_name, remove_stale_partials, replace_folder

__all__ = ["AtomicFolderCheckpoints"]


class AtomicFolderCheckpoints:
    """Mixin placed before a Lightning strategy whose ``save_checkpoint`` writes a folder."""

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        final = Path(self.broadcast(str(filepath)))  # type: ignore[attr-defined]
        if self.is_global_zero:  # type: ignore[attr-defined]
            remove_stale_partials(final.parent, max_depth=0)
        # rank 0 names the temporary folder (the name holds its pid) and every rank writes there
        tmp = Path(self.broadcast(str(partial_name(final))))  # type: ignore[attr-defined]
        try:
            super().save_checkpoint(checkpoint, tmp, storage_options)  # type: ignore[misc]
        except BaseException:
            if self.is_global_zero:  # type: ignore[attr-defined]
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        self.barrier("moeframe-folder-save")  # type: ignore[attr-defined]
        if self.is_global_zero:  # type: ignore[attr-defined]
            # a single file when FSDP2 is told not to save a distributed checkpoint
            replace_folder(tmp, final) if tmp.is_dir() else os.replace(tmp, final)
        self.barrier("moeframe-folder-save-done")  # type: ignore[attr-defined]
