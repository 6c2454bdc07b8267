"""Plugin ``template_name``: registered through its entry point, and moeframe's precision contract."""

from __future__ import annotations

from moeframe_template_name.plugin import TemplateNamePrecision, converted_names

from moeframe.plugin import build_decoder, registry
from moeframe.testing import check_precision_contract, tiny_config


def test_registered_through_the_entry_point() -> None:
    assert registry.load("precision", "template_name") is TemplateNamePrecision
    assert registry.resolve("precision", "template_name").distribution == "moeframe-template-name"


def test_precision_contract() -> None:
    # what the plugin claims to convert: the linear layers outside the high-precision modules
    claimed = set(converted_names(build_decoder(tiny_config())))
    converted = check_precision_contract(TemplateNamePrecision(), claims=lambda name, module: name in claimed)
    assert converted == sorted(claimed)
