"""fsdp2 builds the decoder on the meta device and initialises each rank's shards: the gathered
weights equal an unsharded build with the same seed, bit for bit, and the ranks hold different
halves (not one random stream drawn twice)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moeframe.inspect import load_model_config
from moeframe.model.decoder import build_decoder

_spec = importlib.util.spec_from_file_location("_ptest_helpers", Path(__file__).with_name("_helpers.py"))
helpers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(helpers)

SEED = 1234


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    out = tmp_path_factory.mktemp("fsdp2_init")
    run = subprocess.run(
        [sys.executable, str(helpers.HERE / "_fsdp2_init.py"), str(out), str(SEED)],
        env=helpers.clean_env(MASTER_PORT=str(helpers.free_port())),
        capture_output=True,
        text=True,
        timeout=240,
        cwd=out,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


@pytest.mark.slow
def test_fsdp2_builds_on_the_meta_device_and_shards_what_it_initialises(ranks: list[dict]) -> None:
    assert [r["built_on"] for r in ranks] == ["meta", "meta"]
    assert ranks[0]["sharded"] == ranks[1]["sharded"] and len(ranks[0]["sharded"]) > 20
    for name in ranks[0]["sharded"]:
        a, b, full = ranks[0]["local"][name], ranks[1]["local"][name], ranks[0]["full"][name]
        assert a.shape[0] + b.shape[0] == full.shape[0], name  # each rank holds its half only
        torch.testing.assert_close(torch.cat([a, b]), full, rtol=0, atol=0, msg=name)


@pytest.mark.slow
def test_sharded_init_equals_an_unsharded_build_with_the_same_seed(ranks: list[dict]) -> None:
    torch.manual_seed(SEED)
    reference = build_decoder(load_model_config(helpers.REPO / "configs/model/tiny-v3.yaml"))
    expected = dict(reference.named_parameters())
    assert sorted(ranks[0]["full"]) == sorted(expected)
    for name, value in expected.items():
        torch.testing.assert_close(ranks[0]["full"][name], value.detach(), rtol=0, atol=0, msg=name)
        torch.testing.assert_close(ranks[1]["full"][name], value.detach(), rtol=0, atol=0, msg=name)
    for name, value in reference.named_buffers():
        torch.testing.assert_close(ranks[0]["buffers"][name], value, rtol=0, atol=0, msg=name)
    # the experts are not duplicated: the two halves of a stacked expert weight differ
    w1 = next(n for n in expected if n.endswith("experts.w1"))
    half = expected[w1].shape[0] // 2
    assert not torch.equal(expected[w1][:half], expected[w1][half:])
