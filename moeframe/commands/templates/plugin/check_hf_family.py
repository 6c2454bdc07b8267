"""Plugin ``template_name``: registered through its entry point, and moeframe's hf_family contract."""

from __future__ import annotations

from moeframe_template_name.plugin import TemplateNameFamily

from moeframe.plugin import registry
from moeframe.testing import check_hf_family_contract, tiny_config


def test_registered_through_the_entry_point() -> None:
    assert registry.load("hf_family", "template_name") is TemplateNameFamily
    assert registry.resolve("hf_family", "template_name").distribution == "moeframe-template-name"


def test_hf_family_contract() -> None:
    # a tiny model exported to a template_name folder and imported back: every tensor and the logits equal
    check_hf_family_contract(tiny_config(), family="template_name")
