"""Plugin ``template_name``: registered through its entry point, and moeframe's strategy contract."""

from __future__ import annotations

from moeframe_template_name.plugin import TemplateNameStrategy

from moeframe.plugin import registry
from moeframe.testing import check_strategy_contract


def test_registered_through_the_entry_point() -> None:
    assert registry.load("strategy", "template_name") is TemplateNameStrategy
    assert registry.resolve("strategy", "template_name").distribution == "moeframe-template-name"


def test_strategy_contract() -> None:
    # registers into Lightning's StrategyRegistry and trains 2 steps on 2 CPU processes
    run = check_strategy_contract("template_name", devices=2, max_steps=2)
    assert sorted(run.losses) == [0, 1]
