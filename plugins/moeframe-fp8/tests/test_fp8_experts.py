"""FP8 routed experts: the stacked experts' three projections run the FP8 Linear's recipe per
expert (forward, input gradient and weight gradient), inside ``GroupedExperts``, its LoRA wrapper
and the parallel plugin's ``EPExperts``.

References, written independently of the grouped code: each expert's rows sent through
``fp8_linear`` (the FP8 Linear, itself checked against the recipe in test_fp8_linear.py) and the
float32 per-expert products. Stated tolerances versus float32 as for the Linear (forward <= 4%,
input gradient <= 6.5%, weight gradient <= 6%).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from moeframe.config import ModelConfig
from moeframe.model.experts import GroupedExperts, GroupedOptions
from moeframe.model.lora import LoRAGroupedExperts
from moeframe_fp8 import FP8GroupedGemm, FP8Recipe, fp8_grouped_linear, fp8_linear

TOLERANCE = {"y": 0.04, "dx": 0.065, "dw": 0.06}

# rows per expert: an empty expert, a single row, one past a 128-row tile (wgrad tiles run along
# the expert's own rows) and a ragged remainder
COUNTS = [0, 1, 129, 37, 0, 64]


def rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.detach().float() - ref.detach().float()).norm() / ref.detach().float().norm())


def offsets(counts: list[int]) -> torch.Tensor:
    return torch.tensor(counts).cumsum(0).to(torch.int32)


def per_expert(fn, x: torch.Tensor, w: torch.Tensor, counts: list[int], dy: torch.Tensor) -> dict[str, torch.Tensor]:
    """Run ``fn(x_e, w_e)`` expert by expert on leaves of their own; gradients assembled per expert."""
    x, w = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    y = torch.cat([fn(x_e, w_e) for x_e, w_e in zip(torch.split(x, counts), w)])
    y.backward(dy.to(y.dtype))
    return {"y": y.detach(), "dx": x.grad, "dw": w.grad}


def grouped(
    x: torch.Tensor, w: torch.Tensor, counts: list[int], dy: torch.Tensor, pow2: bool
) -> dict[str, torch.Tensor]:
    x, w = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    y = fp8_grouped_linear(x, w, offsets(counts), FP8Recipe(power_of_two=pow2))
    y.backward(dy)
    return {"y": y.detach(), "dx": x.grad, "dw": w.grad}


@pytest.mark.parametrize("I, O", [(256, 128), (200, 72), (130, 300)])
@pytest.mark.parametrize("pow2", [False, True])
def test_each_expert_runs_the_fp8_linear_recipe(I: int, O: int, pow2: bool) -> None:
    g = torch.Generator().manual_seed(I * O + pow2)
    E, N = len(COUNTS), sum(COUNTS)
    x, dy = torch.randn(N, I, generator=g), torch.randn(N, O, generator=g)
    w = torch.randn(E, O, I, generator=g) / I**0.5
    got = grouped(x, w, COUNTS, dy, pow2)
    recipe = per_expert(lambda x_e, w_e: fp8_linear(x_e, w_e, None, FP8Recipe(power_of_two=pow2)), x, w, COUNTS, dy)
    fp32 = per_expert(lambda x_e, w_e: x_e @ w_e.T, x, w, COUNTS, dy)
    bf16 = per_expert(lambda x_e, w_e: x_e.bfloat16() @ w_e.bfloat16().T, x, w, COUNTS, dy)
    for key in ("y", "dx", "dw"):
        assert got[key].shape == fp32[key].shape and got[key].dtype == torch.float32
        # the same quantised operands and GEMMs as the FP8 Linear on each expert's rows
        # bit for bit where the widths are whole multiples of 4 (every shipped model); the CPU's
        # grouped_mm wants 16-byte rows, and a zero-padded output width (130 -> 132) lets MKL
        # round one element in ~30k one ulp differently
        exact = I % 4 == 0 and O % 4 == 0
        torch.testing.assert_close(got[key], recipe[key], rtol=0 if exact else 2e-6, atol=0 if exact else 1e-6)
        assert rel(got[key], fp32[key]) <= TOLERANCE[key], (key, rel(got[key], fp32[key]))
        assert rel(got[key], fp32[key]) > 3 * rel(bf16[key], fp32[key]), key  # E4M3 really ran
    assert torch.equal(got["dw"][0], torch.zeros(O, I)) and torch.equal(got["dw"][4], torch.zeros(O, I))


@pytest.mark.bad_input
def test_bad_offsets_and_operands_are_named() -> None:
    hook = FP8GroupedGemm(FP8Recipe(), "layers.1.ffn.experts")
    # a direct call's offsets in host memory are read there (no device sync to pay); the experts'
    # hook trusts the experts' own offsets and reads nothing (see the host-reads test)
    with pytest.raises(ValueError, match=r"expert row offsets do not cover the 4 rows: .* exactly 4"):
        fp8_grouped_linear(torch.randn(4, 16), torch.randn(2, 8, 16), offsets([2, 3]))
    with pytest.raises(ValueError, match=r"expert row offsets do not cover the 4 rows"):
        fp8_grouped_linear(torch.randn(4, 16), torch.randn(2, 8, 16), torch.tensor([5, 4], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"expert row offsets do not cover the 4 rows"):
        fp8_grouped_linear(torch.randn(4, 16), torch.randn(2, 8, 16), torch.tensor([-1, 4], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"3 expert row offsets for 2 experts"):
        hook("w1", torch.randn(4, 8), torch.randn(2, 16, 8), offsets([2, 1, 1]))
    with pytest.raises(ValueError, match=r"experts 'layers\.1\.ffn\.experts'\.w2: rows of shape \(4, 8\) do not fit"):
        hook("w2", torch.randn(4, 8), torch.randn(2, 8, 16), offsets([2, 2]))
    with pytest.raises(TypeError, match=r"experts 'layers\.1\.ffn\.experts'\.w1 got torch\.int64 rows"):
        hook("w1", torch.ones(4, 8, dtype=torch.long), torch.randn(2, 16, 8), offsets([2, 2]))


def experts_module(E: int = 6, D: int = 192, F_: int = 160) -> GroupedExperts:
    torch.manual_seed(0)
    experts = GroupedExperts(ModelConfig(), GroupedOptions(), E, D, F_)
    for p in experts.parameters():
        torch.nn.init.normal_(p, std=D**-0.5)
    return experts


def routing(T: int, E: int, K: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(T)
    indices = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    return torch.rand(T, K, generator=g), indices


def reference_moe(
    experts: GroupedExperts, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor
) -> torch.Tensor:
    """y_t = Σ_k g_tk · SwiGLU_e(x_t), every projection an FP8 Linear, token by expert."""
    y = torch.zeros_like(x)
    for e in range(experts.num_experts):
        tokens, slot = (indices == e).nonzero(as_tuple=True)
        if len(tokens):
            h = F.silu(fp8_linear(x[tokens], experts.w1[e])) * fp8_linear(x[tokens], experts.w3[e])
            y = y.index_add(0, tokens, fp8_linear(h, experts.w2[e]) * weights[tokens, slot, None])
    return y


def test_grouped_experts_with_the_fp8_hook_match_fp8_linears_per_expert() -> None:
    experts = experts_module()
    x = torch.randn(40, 192, requires_grad=True)
    weights, indices = routing(40, 6)
    experts.grouped_gemm = FP8GroupedGemm(FP8Recipe(), "experts")
    y = experts(x, weights, indices)
    y.square().sum().backward()
    x_ref = x.detach().clone().requires_grad_()
    y_ref = reference_moe(experts, x_ref, weights, indices)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    grads = {n: p.grad.clone() for n, p in experts.named_parameters()}
    experts.zero_grad()
    y_ref.square().sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-6)
    for n, p in experts.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, rtol=1e-5, atol=1e-6)
    experts.grouped_gemm = None  # without the hook: the float32 layer, different from FP8
    assert rel(experts(x.detach(), weights, indices), y.detach()) > 1e-3


def test_lora_experts_run_their_frozen_base_in_fp8() -> None:
    experts = experts_module()
    x = torch.randn(24, 192)
    weights, indices = routing(24, 6)
    experts.grouped_gemm = FP8GroupedGemm(FP8Recipe(), "experts.base")
    base_fp8 = experts(x, weights, indices)
    lora = LoRAGroupedExperts(experts, rank=4, scale=2.0)  # B starts at zero: the base alone
    torch.testing.assert_close(lora(x, weights, indices), base_fp8, rtol=1e-6, atol=1e-7)


def test_ep_experts_keep_the_fp8_hook_and_compute_the_same(tmp_path) -> None:
    """``EPExperts`` (1-rank gloo group): built from FP8 experts, it keeps the hook and its
    forward and expert gradients equal GroupedExperts'."""
    from moeframe_parallel.ep_experts import EPExperts

    experts = experts_module()
    experts.grouped_gemm = FP8GroupedGemm(FP8Recipe(), "experts")
    x = torch.randn(32, 192)
    weights, indices = routing(32, 6)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        shard = EPExperts.from_full(experts, dist.group.WORLD)
        assert shard.grouped_gemm is experts.grouped_gemm
        y_ep = shard(x, weights, indices)
        y_ep.square().sum().backward()
    finally:
        dist.destroy_process_group()
    y = experts(x, weights, indices)
    y.square().sum().backward()
    torch.testing.assert_close(y_ep, y, rtol=1e-6, atol=1e-7)
    for name in ("w1", "w2", "w3"):
        torch.testing.assert_close(getattr(shard, name).grad, getattr(experts, name).grad, rtol=1e-6, atol=1e-7)


# -- no host synchronisation in the FP8 MoE forward/backward ----------------------------------------
class HostReads(TorchDispatchMode):
    """Records every op that needs tensor data on the host or whose output size depends on data.

    On a GPU these are the host syncs (``.item()``/``.tolist()``/``int(t)`` all reach
    ``aten._local_scalar_dense``; ``nonzero``, ``masked_select``, ``unique``, ``bincount`` and a
    ``repeat_interleave`` without ``output_size`` must read the data to size their output). The
    CPU has no device queue to wait for, so ``torch.cuda.set_sync_debug_mode`` cannot be used here;
    the dispatcher sees the same ops on every device. ``Tensor.tolist`` reads the CPU data without
    a dispatcher op (on a GPU it copies to the host first), so it is wrapped while the mode is on."""

    NAMES = (
        "_local_scalar_dense",
        "nonzero",
        "masked_select",
        "unique",
        "_unique2",
        "unique_consecutive",
        "bincount",
        "repeat_interleave",
    )

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __enter__(self) -> HostReads:
        self._tolist = torch.Tensor.tolist

        def tolist(t: torch.Tensor):  # noqa: ANN202
            self.seen.append("Tensor.tolist")
            return self._tolist(t)

        torch.Tensor.tolist = tolist
        return super().__enter__()

    def __exit__(self, *exc) -> None:  # noqa: ANN002
        torch.Tensor.tolist = self._tolist
        super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        name = func.overloadpacket.__name__
        if name in self.NAMES and not (name == "repeat_interleave" and (kwargs or {}).get("output_size")):
            self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


def test_the_detector_sees_host_reads() -> None:
    with HostReads() as mode:
        torch.tensor([1, 2]).tolist()
        torch.tensor([0, 3]).nonzero()
        int(torch.tensor(3))
    assert mode.seen == ["Tensor.tolist", "aten.nonzero.default", "aten._local_scalar_dense.default"]
    assert torch.Tensor.tolist is mode._tolist  # put back


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_experts_forward_and_backward_read_nothing_on_the_host(dtype: torch.dtype) -> None:
    experts = experts_module().to(dtype)
    experts.grouped_gemm = FP8GroupedGemm(FP8Recipe(), "experts")
    x = torch.randn(40, 192, dtype=dtype, requires_grad=True)
    weights, indices = routing(40, 6)
    with HostReads() as mode:
        experts(x, weights, indices).float().square().sum().backward()
    assert mode.seen == [] and experts.w1.grad is not None and x.grad is not None


def assert_compiled_equals_eager(experts: nn.Module, compiled: Callable, rows: int) -> None:
    """Output, input gradient and every weight gradient of ``compiled`` equal eager's bit for bit."""
    x = torch.randn(rows, 192)
    weights, indices = routing(rows, 6)
    results = []
    for fn in (experts, compiled):
        experts.zero_grad()
        x_ = x.clone().requires_grad_()
        y = fn(x_, weights, indices)
        y.square().sum().backward()
        results.append([y.detach(), x_.grad] + [p.grad.clone() for p in experts.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def told_outside_the_graph(seen: list[warnings.WarningMessage]) -> list[warnings.WarningMessage]:
    return [w for w in seen if "to stay in the graph" in str(w.message)]


def test_before_torch_2_13_fp8_experts_run_outside_the_compiled_graph_with_the_same_numbers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """torch 2.11 compiles the FP8 experts' backward to zero gradients: there the plugin keeps their
    GEMMs out of the graph and says so once, when they really are compiled (an eager run is not
    told). Forced here on the tested torch: a graph break (fullgraph refuses it), and eager's numbers."""
    from moeframe_fp8 import grouped

    monkeypatch.setattr(grouped, "COMPILES_IN_GRAPH", False)
    monkeypatch.setattr(grouped, "_TOLD_OUTSIDE_THE_GRAPH", False)
    torch._dynamo.reset()
    experts = experts_module()
    x = torch.randn(24, 192)
    weights, indices = routing(24, 6)
    with warnings.catch_warnings(record=True) as eager_run:
        warnings.simplefilter("always")
        experts.grouped_gemm = FP8GroupedGemm(FP8Recipe(), "experts")
        experts(x, weights, indices)
    assert not told_outside_the_graph(eager_run)  # nothing to say without compile
    with pytest.raises(Exception, match="disable"):
        torch.compile(experts, fullgraph=True, backend="eager")(x, weights, indices)
    torch._dynamo.reset()
    with pytest.warns(UserWarning, match=r"need torch >= 2\.13 to stay in the graph") as told:
        assert_compiled_equals_eager(experts, torch.compile(experts, backend="aot_eager"), rows=24)
    assert len(told_outside_the_graph(told)) == 1  # once, not once per layer or call
    torch._dynamo.reset()


@pytest.mark.slow
def test_fp8_experts_compile_in_one_graph_with_the_same_numbers() -> None:
    """fullgraph=True: a host read or data-dependent shape would be a graph break, i.e. an error.
    aot_eager traces the backward too; the numbers equal the eager ones bit for bit."""
    torch._dynamo.reset()
    experts = experts_module()
    experts.grouped_gemm = FP8GroupedGemm(FP8Recipe(), "experts")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert_compiled_equals_eager(experts, torch.compile(experts, fullgraph=True, backend="aot_eager"), rows=40)
    assert not told_outside_the_graph(seen)  # on this torch they stay in the graph: nothing to say
    torch._dynamo.reset()
