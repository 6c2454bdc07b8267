"""Plugin ``template_name``: registered through its entry point, and moeframe's norm contract."""

from __future__ import annotations

from moeframe_template_name.plugin import TemplateNameNorm

from moeframe.plugin import registry
from moeframe.testing import check_norm_contract, tiny_config


def test_registered_through_the_entry_point() -> None:
    assert registry.load("norm", "template_name") is TemplateNameNorm
    assert registry.resolve("norm", "template_name").distribution == "moeframe-template-name"


def test_norm_contract() -> None:
    check_norm_contract(tiny_config(norm={"name": "template_name"}))
