"""Config validation: every mistake is a ConfigError naming the field and the fix, before allocation."""

from __future__ import annotations

import dataclasses

import pytest

from moeframe.config import ConfigError, ModelConfig, OptimConfig, resolve_model_config


def tiny(**changes: object) -> ModelConfig:
    return dataclasses.replace(ModelConfig(), **changes)


def test_defaults_resolve_to_builtin_plugins() -> None:
    plan = resolve_model_config(ModelConfig())
    assert (plan.attention.name, plan.router.name, plan.experts.name, plan.norm.name) == (
        "mha",
        "topk",
        "grouped",
        "rmsnorm",
    )


@pytest.mark.parametrize(
    ("changes", "fragments"),
    [
        ({"n_heads": 5}, ["n_heads=5", "must divide model.dim=128", "n_heads=4"]),
        ({"n_activated_experts": 9}, ["n_activated_experts", "larger than", "n_routed_experts = 8"]),
        ({"n_expert_groups": 3}, ["n_expert_groups=3", "must divide", "n_routed_experts=8"]),
        ({"n_expert_groups": 4, "n_limited_groups": 5}, ["n_limited_groups=5", "cannot exceed"]),
        (
            {"n_expert_groups": 4, "n_limited_groups": 1, "n_activated_experts": 3},
            ["n_activated_experts=3", "kept groups (1 groups x 2 experts)"],
        ),
        ({"first_k_dense": 7}, ["first_k_dense=7", "n_layers=4"]),
        ({"dim": 0}, ["model.dim must be a positive number"]),
        ({"mtp_depth": -1}, ["model.mtp_depth must be an integer >= 0"]),
    ],
)
def test_impossible_shapes_are_rejected(changes: dict, fragments: list[str]) -> None:
    with pytest.raises(ConfigError) as err:
        resolve_model_config(tiny(**changes))
    for fragment in fragments:
        assert fragment in str(err.value)


def test_unknown_plugin_name_suggests_the_close_one() -> None:
    with pytest.raises(ConfigError) as err:
        resolve_model_config(tiny(attention={"name": "mhaa"}))
    msg = str(err.value)
    assert "unknown attention plugin 'mhaa'" in msg
    assert "Did you mean 'mha'?" in msg
    assert "moeframe.attention" in msg


def test_unknown_plugin_option_names_plugin_field_and_valid_options() -> None:
    with pytest.raises(ConfigError) as err:
        resolve_model_config(tiny(attention={"name": "mha", "n_kv_head": 2}))
    msg = str(err.value)
    assert "attention plugin 'mha' has no option 'n_kv_head'" in msg
    assert "n_kv_heads" in msg


def test_wrong_option_type_is_rejected() -> None:
    with pytest.raises(ConfigError, match="option 'aux_loss_coef' must be"):
        resolve_model_config(tiny(router={"name": "topk", "aux_loss_coef": "lots"}))


def test_plugin_cross_field_validation() -> None:
    with pytest.raises(ConfigError, match="n_kv_heads=3 must be a positive divisor of model.n_heads=4"):
        resolve_model_config(tiny(attention={"name": "mha", "n_kv_heads": 3}))


def test_plugin_spec_must_be_a_mapping_with_a_name() -> None:
    with pytest.raises(ConfigError, match="must be a mapping with a plugin 'name'"):
        resolve_model_config(tiny(router={"aux_loss_coef": 0.1}))


def test_optim_validation() -> None:
    with pytest.raises(ConfigError, match="optim.betas"):
        OptimConfig(betas=(0.9, 1.5)).validate()
    with pytest.raises(ConfigError, match="optim.lr"):
        OptimConfig(lr=0).validate()
