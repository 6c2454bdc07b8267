"""Plugin ``template_name``: registered through its entry point, and moeframe's attention contract."""

from __future__ import annotations

from moeframe_template_name.plugin import TemplateNameAttention

from moeframe.plugin import registry
from moeframe.testing import check_attention_contract, tiny_config


def test_registered_through_the_entry_point() -> None:
    assert registry.load("attention", "template_name") is TemplateNameAttention
    assert registry.resolve("attention", "template_name").distribution == "moeframe-template-name"


def test_attention_contract() -> None:
    # cache=False until the plugin implements new_cache(); then drop it to check cached decoding too
    check_attention_contract(tiny_config(attention={"name": "template_name"}), cache=False)
