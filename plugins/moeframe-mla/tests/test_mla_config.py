"""Attention ``mla``: inconsistent dimensions fail at config time, naming the plugin and the field;
the shipped tiny-mla config trains through the real CLI parser."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning  # noqa: F401  (imported outside any test: it binds a log handler to sys.stderr)
import pytest

from moeframe.cli import main
from moeframe.config import ConfigError, resolve_model_config
from moeframe.testing import tiny_config

CONFIGS = Path(__file__).resolve().parents[3] / "configs"
TINY_MLA: dict[str, Any] = dict(
    name="mla", q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6
)


@pytest.mark.parametrize(
    ("changes", "fragments"),
    [
        ({"qk_rope_head_dim": 5}, ["qk_rope_head_dim=5", "even"]),
        (
            {"qk_nope_head_dim": -6, "qk_rope_head_dim": 8},
            [
                "qk_nope_head_dim=-6",
                "rope part (qk_rope_head_dim=8) must be smaller",
                "head dim qk_nope_head_dim + qk_rope_head_dim = 2",
            ],
        ),
        ({"kv_lora_rank": 0}, ["kv_lora_rank=0 must be > 0"]),
        ({"q_lora_rank": 0}, ["q_lora_rank=0", "null for a plain query projection"]),
        ({"v_head_dim": 0}, ["v_head_dim=0"]),
        ({"rope_factor": 40.0}, ["rope_factor=40.0 needs original_seq_len"]),
        ({"rope_factor": 0.5}, ["rope_factor=0.5 must be >= 1"]),
        (
            {"rope_factor": 4.0, "original_seq_len": 16, "beta_fast": 1.0, "beta_slow": 32.0},
            ["beta_fast > beta_slow > 0", "beta_fast=1.0"],
        ),
        ({"kv_lora_rnk": 16}, ["has no option 'kv_lora_rnk'", "kv_lora_rank"]),
        ({"kv_lora_rank": 16.5}, ["option 'kv_lora_rank' must be"]),
        ({"decode": "fast"}, ["option 'decode' must be"]),
    ],
    ids=lambda v: str(v)[:40],
)
def test_inconsistent_dims_are_rejected_at_config_time(changes: dict[str, Any], fragments: list[str]) -> None:
    with pytest.raises(ConfigError) as err:
        resolve_model_config(tiny_config(attention={**TINY_MLA, **changes}))
    message = str(err.value)
    assert message.startswith("model.attention:")
    for fragment in fragments:
        assert fragment in message, message


def test_rope_theta_falls_back_to_the_model_field() -> None:
    plan = resolve_model_config(tiny_config(rope_theta=1234.0, attention=TINY_MLA))
    assert plan.attention.options.rope_theta is None
    attn = plan.attention.cls(plan.config, plan.attention.options, 0)
    assert attn.rope_theta == 1234.0
    plan = resolve_model_config(tiny_config(rope_theta=1234.0, attention={**TINY_MLA, "rope_theta": 50.0}))
    assert plan.attention.cls(plan.config, plan.attention.options, 0).rope_theta == 50.0


def test_a_bad_option_on_the_command_line_is_one_clear_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        [
            "fit",
            "-c",
            str(CONFIGS / "pretrain" / "tiny-mla.yaml"),
            "--trainer.default_root_dir",
            str(tmp_path),
            "--model.init_args.config.attention.qk_rope_head_dim",
            "15",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert "model.attention: qk_rope_head_dim=15 must be a positive even number" in err and "Traceback" not in err
