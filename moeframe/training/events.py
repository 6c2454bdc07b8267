"""Run events (a preemption, a skipped step, a collapsed expert...): one JSON object per line in
``<log dir>/events.jsonl``, a line in the log, and a running count per kind sent to the loggers as
``reliability/events/<kind>``. Written by rank 0; every rank keeps its own list."""

from __future__ import annotations

import json
import time
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

from moeframe.training.callbacks import log_dir

__all__ = ["EVENTS_FILE", "write_event"]

EVENTS_FILE = "events.jsonl"


def write_event(trainer: L.Trainer, events: list[dict[str, Any]], kind: str, **fields: Any) -> dict[str, Any]:
    """Append the event to ``events`` (the caller's record) and, on rank 0, to events.jsonl and the
    loggers (at the event's ``step``, else the trainer's global step)."""
    record = {"event": kind, "time": round(time.time(), 3), **fields}
    events.append(record)
    if trainer.global_rank != 0:
        return record
    rank_zero_info(f"moeframe event: {json.dumps(record)}")
    path = log_dir(trainer) / EVENTS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
    count = float(sum(e["event"] == kind for e in events))
    for logger in trainer.loggers:
        logger.log_metrics({f"reliability/events/{kind}": count}, step=int(fields.get("step", trainer.global_step)))
    return record
