"""Layouts that cannot work fail with a message that says what to change, before any process
group exists (a wrong layout must never turn into a hang inside a collective)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from moeframe_parallel.deepspeed_presets import Zero1Strategy, Zero2Strategy, Zero3OffloadStrategy, Zero3Strategy
from moeframe_parallel.expert_parallel import EP2DDPStrategy, ExpertParallelStrategy, check_ep_size

_spec = importlib.util.spec_from_file_location("_ptest_helpers", Path(__file__).with_name("_helpers.py"))
helpers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(helpers)

CONFIG = helpers.REPO / "configs" / "pretrain" / "tiny-parallel.yaml"


@pytest.mark.parametrize(
    "ep_size, world, experts, fragment",
    [
        (2, 3, 8, "does not divide the world size 3"),
        (4, 8, 6, "does not divide n_routed_experts=6"),
        (0, 2, 8, "must be >= 1"),
    ],
)
def test_ep_layout_errors(ep_size: int, world: int, experts: int, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        check_ep_size(ep_size, world, experts)


def test_ep_layouts_that_fit() -> None:
    check_ep_size(2, 4, 8)
    check_ep_size(8, 16, 256)  # V3: 256 experts, EP 8 within a node, 2 nodes
    assert EP2DDPStrategy().ep_size == 2 and ExpertParallelStrategy(ep_size=4).ep_size == 4


def test_presets_construct_with_their_stage() -> None:
    assert [s().zero_stage_3 for s in (Zero1Strategy, Zero2Strategy, Zero3Strategy)] == [False, False, True]
    offload = Zero3OffloadStrategy()
    zero = offload.config["zero_optimization"]
    assert zero["stage"] == 3 and zero["offload_param"]["device"] == "cpu"
    assert zero["offload_optimizer"]["device"] == "cpu"


def test_zero_offload_accepts_torch_adamw() -> None:
    offload = Zero3OffloadStrategy()
    assert offload.config.get("zero_force_ds_cpu_optimizer") is False


@pytest.mark.parametrize(
    "make, fragment",
    [
        (lambda: Zero2Strategy(offload_parameters=True), "offload_parameters=True needs ZeRO stage 3"),
        (lambda: Zero1Strategy(offload_params_device="nvme", offload_parameters=True), "needs ZeRO stage 3"),
        (lambda: Zero3Strategy(offload_parameters=True, offload_params_device="nvme", nvme_path=""), "needs nvme_path"),
        (lambda: Zero3Strategy(stage=4), "stage must be 1, 2 or 3"),
    ],
)
def test_zero_settings_deepspeed_cannot_honour(make, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        make()


@pytest.mark.slow
def test_ep_degree_not_dividing_the_experts_fails_fast_through_the_cli(tmp_path: Path) -> None:
    """2 processes, ep2_ddp, 5 experts: both ranks stop in setup_environment, before the process
    group; a hang would hit the timeout instead."""
    cmd = [
        sys.executable,
        "-m",
        "moeframe.cli",
        "fit",
        "-c",
        str(CONFIG),
        "--trainer.strategy",
        "ep2_ddp",
        "--model.init_args.config.n_routed_experts",
        "5",
        "--trainer.max_steps",
        "1",
        "--trainer.default_root_dir",
        str(tmp_path / "run"),
        "--data.init_args.max_bytes",
        "300000",
    ]
    result = subprocess.run(
        cmd,
        env=helpers.clean_env(MOEFRAME_CACHE=str(tmp_path / "cache")),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "ep_size=2 does not divide n_routed_experts=5" in result.stderr, result.stderr[-3000:]
