"""Plugin ``template_name``: registered through its entry point, and moeframe's experts contract."""

from __future__ import annotations

from moeframe_template_name.plugin import TemplateNameExperts

from moeframe.plugin import registry
from moeframe.testing import check_experts_contract, tiny_config


def test_registered_through_the_entry_point() -> None:
    assert registry.load("experts", "template_name") is TemplateNameExperts
    assert registry.resolve("experts", "template_name").distribution == "moeframe-template-name"


def test_experts_contract() -> None:
    check_experts_contract(tiny_config(experts={"name": "template_name"}))
