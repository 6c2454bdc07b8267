"""Plugin ``template_name``: registered through its entry point, and moeframe's residual contract."""

from __future__ import annotations

from moeframe_template_name.plugin import TemplateNameResidual

from moeframe.plugin import registry
from moeframe.testing import check_residual_contract, tiny_config


def test_registered_through_the_entry_point() -> None:
    assert registry.load("residual", "template_name") is TemplateNameResidual
    assert registry.resolve("residual", "template_name").distribution == "moeframe-template-name"


def test_residual_contract() -> None:
    check_residual_contract(tiny_config(residual={"name": "template_name"}))
