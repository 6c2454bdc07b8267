"""Plugin ``template_name``: registered through its entry point, and moeframe's router contract."""

from __future__ import annotations

from moeframe_template_name.plugin import TemplateNameRouter

from moeframe.plugin import registry
from moeframe.testing import check_router_contract, tiny_config


def test_registered_through_the_entry_point() -> None:
    assert registry.load("router", "template_name") is TemplateNameRouter
    assert registry.resolve("router", "template_name").distribution == "moeframe-template-name"


def test_router_contract() -> None:
    check_router_contract(tiny_config(router={"name": "template_name"}), weights_sum_to=1.0)
    check_router_contract(
        tiny_config(router={"name": "template_name", "temperature": 0.5}, route_scale=2.5), weights_sum_to=2.5
    )
