"""What a resumed run writes to its logs: the same (step, value) rows as the run that was never
interrupted, whichever kind of checkpoint it resumed from (Lightning 2.6 labels every later row one
step late after some of them; see ``moeframe.training.callbacks.LoggerStepAfterResume``)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from .test_reliability import fit_args, run

# epochs of 4 batches, validated at each epoch end: ModelCheckpoint then saves at the epoch's end
EPOCH_END_VAL = [
    "--trainer.limit_train_batches",
    "4",
    "--trainer.val_check_interval",
    "1.0",
    "--trainer.check_val_every_n_epoch",
    "1",
    "--trainer.limit_val_batches",
    "2",
]
# validation every 4 steps within a long epoch
MID_EPOCH_VAL = [
    "--trainer.val_check_interval",
    "4",
    "--trainer.check_val_every_n_epoch",
    "null",
    "--trainer.limit_val_batches",
    "2",
]


def logged_rows(root: Path) -> list[tuple[str, int, str]]:
    """(metric, step, value as written) of train/loss, val/loss and the learning rate, every version in order."""
    rows = []
    for f in sorted((root / "logs").glob("version_*/metrics.csv"), key=lambda p: int(p.parent.name.split("_")[1])):
        for r in csv.DictReader(f.open()):
            rows += [
                (k, int(r["step"]), v)
                for k, v in r.items()
                if v and (k in ("train/loss", "val/loss") or k.startswith("lr-"))
            ]
    return rows


def _saver(folder: Path) -> str:
    return json.dumps(
        {
            "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {
                "dirpath": str(folder),
                "monitor": "val/loss",
                "save_top_k": -1,
                "filename": "s{step}",
                "auto_insert_metric_name": False,
            },
        }
    )


@pytest.mark.slow
@pytest.mark.parametrize("checkpoint", ["epoch_end", "after_fit"])
def test_resumed_run_logs_the_same_steps_as_the_straight_run(tmp_path: Path, checkpoint: str) -> None:
    """Resume from a checkpoint written at a validation boundary: ModelCheckpoint at the end of an
    epoch (after its validation), or ``trainer.save_checkpoint`` after ``fit`` stopped at a step
    that was validated; every later train/loss, val/loss and learning-rate row keeps its step."""
    extra = EPOCH_END_VAL if checkpoint == "epoch_end" else MID_EPOCH_VAL
    code, out = run(
        {}, fit_args(tmp_path / "straight", 10, *extra, "--trainer.callbacks+", _saver(tmp_path / "ck")), tmp_path
    )
    assert code == 0, out[-3000:]
    if checkpoint == "epoch_end":
        ckpt, resumed = tmp_path / "ck" / "s4.ckpt", tmp_path / "resumed"
        expected = [row for row in logged_rows(tmp_path / "straight") if row[1] >= 4]
    else:
        ckpt, resumed = tmp_path / "final.ckpt", tmp_path / "resumed"
        code, out = run({"final": str(ckpt)}, fit_args(resumed, 8, *extra), tmp_path)
        assert code == 0, out[-3000:]
        expected = logged_rows(tmp_path / "straight")
    code, out = run({}, fit_args(resumed, 10, *extra, "--ckpt_path", str(ckpt)), tmp_path)
    assert code == 0, out[-3000:]
    straight = logged_rows(tmp_path / "straight")
    assert any(k == "val/loss" for k, _, _ in straight) and any(k.startswith("lr-") for k, _, _ in straight)
    assert logged_rows(resumed) == expected
