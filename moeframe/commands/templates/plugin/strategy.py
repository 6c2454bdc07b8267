"""Strategy plugin ``template_name``: DDP over gloo with a short collective timeout (a starting point).

A Lightning ``Strategy`` subclass whose no-argument construction is the preset; moeframe
registers it into Lightning's StrategyRegistry, so ``--trainer.strategy template_name`` selects it.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from lightning.pytorch.strategies import DDPStrategy


class TemplateNameStrategy(DDPStrategy):
    plugin_api = "2"  # the moeframe plugin API this class is written against

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("process_group_backend", "gloo")
        kwargs.setdefault("timeout", timedelta(minutes=5))  # a lost rank fails fast, not after 30 min
        super().__init__(**kwargs)
