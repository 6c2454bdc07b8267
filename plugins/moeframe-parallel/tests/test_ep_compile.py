"""EP experts under ``compile: block``: one graph per block, eager's numbers (2 real gloo processes).

The MoE block holding ``EPExperts`` (attention, router, dispatch with its variable-size
all-to-alls, the local experts' grouped GEMMs, combine) must trace without a graph break, and the
blocks compiled with ``fullgraph=True`` must give each rank the loss and every gradient (the
local expert shards included, which hold the other rank's tokens' contributions) of the eager
EP model: aot_eager runs the same kernels, so float32 matches to 1e-6 and bfloat16 within
bf16 rounding. The second step routes differently and runs under ``fail_on_recompile``: the
split sizes are symbolic in the graph, not specialised. The one host read left (the split sizes,
which the all-to-all takes on the host) happens once per EP layer forward, never in the backward.
FP8 EP experts (the fp8 plugin's emulated grouped GEMM in the seam) compile in one graph too.
``_ep_compile_rank.py`` is the rank.
Eager EP itself is checked against EP=1 in ``test_ep_parity.py``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

_spec = importlib.util.spec_from_file_location("_ptest_helpers", Path(__file__).with_name("_helpers.py"))
helpers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(helpers)

DTYPES = {"float32": 1e-6, "bfloat16": 1e-2}  # tolerance (relative and absolute) per dtype


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    out = tmp_path_factory.mktemp("ep_compile")
    return helpers.run_two_ranks("_ep_compile_rank.py", out, ["aot_eager", *DTYPES], timeout_s=300)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_ep_moe_block_has_no_graph_break(ranks: list[dict], dtype: str) -> None:
    assert [result[dtype]["graph_breaks"] for result in ranks] == [0, 0]


@pytest.mark.slow
def test_ep_reads_the_split_sizes_to_the_host_once_per_forward_and_never_in_backward(ranks: list[dict]) -> None:
    # one EP MoE layer in the model; nothing else in the decoder reads tensor data to the host
    assert [result["float32"]["host_reads"] for result in ranks] == [(1, 0), (1, 0)]


@pytest.mark.slow
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_compiled_ep_matches_eager_on_every_rank(ranks: list[dict], dtype: str) -> None:
    tol = DTYPES[dtype]
    for result in ranks:
        assert len(result[dtype]["steps"]) == 2
        for step in result[dtype]["steps"]:
            (loss0, grads0), (loss1, grads1) = step["eager"], step["compiled"]
            torch.testing.assert_close(loss1, loss0, rtol=tol, atol=tol)
            assert grads1.keys() == grads0.keys()
            assert {"layers.1.ffn.experts.w1", "layers.1.ffn.experts.w2", "layers.1.ffn.experts.w3"} <= grads0.keys()
            for name, g in grads0.items():
                assert g.abs().sum() > 0, name
                torch.testing.assert_close(grads1[name], g, rtol=tol, atol=tol, msg=name)
    # the ranks ran different tokens (so different split sizes in each direction)
    assert ranks[0][dtype]["steps"][0]["eager"][0] != ranks[1][dtype]["steps"][0]["eager"][0]


@pytest.mark.slow
def test_fp8_ep_experts_compile_in_one_graph_with_eagers_numbers(ranks: list[dict]) -> None:
    for result in ranks:
        fp8 = result["fp8"]
        assert fp8["graph_breaks"] == 0
        assert len(fp8["eager"]) == 5  # output, input gradient, w1/w2/w3 gradients
        for eager, compiled in zip(fp8["eager"], fp8["compiled"], strict=True):
            assert eager.abs().sum() > 0
            torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-6)
