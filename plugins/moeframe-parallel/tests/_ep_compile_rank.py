"""One rank of test_ep_compile.py's 2-process gloo check (the underscore keeps pytest away).

For each dtype, both ranks build the same seeded decoder (a dense block, then one MoE block with 8
experts top-2) and swap its experts for ``EPExperts`` shards over a 2-rank ep_group; a copy gets
``compile: block`` (each block ``fullgraph=True``, any graph break is an error). Each rank then
runs its own batch through both, twice, with different tokens (so different routing and
all-to-all split sizes): the second step runs under ``fail_on_recompile``, so a split size that
the compiled graph had specialised on would fail here. Saved per dtype: the graph-break count of
the MoE block (``torch._dynamo.explain``, forward), the host reads of one eager forward and of its
backward (``Tensor.tolist`` calls and ``aten._local_scalar_dense``, what ``.item()`` runs), and
per step the loss and every gradient of both. Then the same for FP8 EP experts alone (the fp8
plugin's emulated grouped GEMM in the experts' seam): graph breaks, and eager against
``fullgraph=True`` outputs and gradients.

usage: python _ep_compile_rank.py RANK WORLD_SIZE PORT OUT.pt BACKEND DTYPE [DTYPE ...]
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from moeframe.compat import capture_scalar_outputs
from moeframe.config import ModelConfig
from moeframe.model.context import ForwardContext
from moeframe.model.decoder import Decoder, build_decoder
from moeframe.model.experts import GroupedExperts, GroupedOptions
from moeframe.testing import tiny_config
from moeframe_fp8 import FP8GroupedGemm, FP8Recipe
from moeframe_parallel.ep_experts import EPExperts, replace_experts
from moeframe_parallel.expert_parallel import new_ep_groups

BATCH, SEQ_LEN, STEPS = 2, 16, 2


def model_config() -> ModelConfig:
    # moeframe.testing's contract config: widths whose rows are 16-byte aligned in float32 and bf16
    # (the grouped GEMM path)
    return tiny_config(max_seq_len=SEQ_LEN)


def loss_and_grads(decoder: Decoder, ids_BT: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    decoder.zero_grad(set_to_none=True)
    out = decoder(ids_BT[:, :-1])
    loss = F.cross_entropy(out.logits.flatten(0, 1).float(), ids_BT[:, 1:].flatten()) + out.aux_loss
    loss.backward()
    return loss.detach(), {n: p.grad.float().clone() for n, p in decoder.named_parameters() if p.grad is not None}


class _ScalarReads(TorchDispatchMode):
    def __init__(self, seen: list[str]) -> None:
        super().__init__()
        self.seen = seen

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if func is torch.ops.aten._local_scalar_dense.default:
            self.seen.append("item")
        return func(*args, **(kwargs or {}))


@contextmanager
def host_reads() -> Iterator[list[str]]:
    """Every read of tensor data to the host (``.item()``, ``.tolist()``) while active."""
    seen: list[str] = []
    tolist = torch.Tensor.tolist

    def counting_tolist(self: torch.Tensor) -> Any:
        seen.append("tolist")
        return tolist(self)

    torch.Tensor.tolist = counting_tolist  # type: ignore[method-assign]
    try:
        with _ScalarReads(seen):
            yield seen
    finally:
        torch.Tensor.tolist = tolist  # type: ignore[method-assign]


def eager_host_reads(decoder: Decoder, ids_BT: torch.Tensor) -> tuple[int, int]:
    """Host reads of one forward and of its backward."""
    decoder.zero_grad(set_to_none=True)
    with host_reads() as seen:
        out = decoder(ids_BT[:, :-1])
        loss = F.cross_entropy(out.logits.flatten(0, 1).float(), ids_BT[:, 1:].flatten()) + out.aux_loss
        forward = len(seen)
        loss.backward()
    return forward, len(seen) - forward


def moe_block_graph_breaks(decoder: Decoder, dtype: torch.dtype) -> int:
    block = decoder.layers[1]
    assert isinstance(block.ffn.experts, EPExperts)
    x_BTD = torch.randn(BATCH, SEQ_LEN, decoder.config.dim, dtype=dtype)
    ctx = ForwardContext(torch.arange(SEQ_LEN), torch.zeros(BATCH, SEQ_LEN, dtype=torch.long), layer_id=1)
    with capture_scalar_outputs():  # what Block.compile scopes to the compiled block's calls
        explanation = torch._dynamo.explain(block)(x_BTD, ctx)
    torch._dynamo.reset()
    print("break reasons:", explanation.break_reasons, flush=True)
    return explanation.graph_break_count


def compare(rank: int, ep_group: dist.ProcessGroup, dtype: torch.dtype, backend: str) -> dict:
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = build_decoder(model_config()).to(dtype)
    compiled = copy.deepcopy(eager)
    replace_experts(eager, ep_group)
    replace_experts(compiled, ep_group)
    result: dict = {"graph_breaks": moe_block_graph_breaks(compiled, dtype), "steps": []}
    result["host_reads"] = eager_host_reads(eager, torch.randint(0, 64, (BATCH, SEQ_LEN + 1)))
    for block in compiled.blocks():
        block.compile(fullgraph=True, backend=backend)
    gen = torch.Generator().manual_seed(10 + rank)  # each rank its own tokens
    for step in range(STEPS):
        ids_BT = torch.randint(0, 64, (BATCH, SEQ_LEN + 1), generator=gen)
        loss0, grads0 = loss_and_grads(eager, ids_BT)
        stance = "fail_on_recompile" if step > 0 else "default"
        with torch.compiler.set_stance(stance):
            loss1, grads1 = loss_and_grads(compiled, ids_BT)
        result["steps"].append({"eager": (loss0, grads0), "compiled": (loss1, grads1)})
    return result


def fp8_experts_check(ep_group: dist.ProcessGroup, rank: int, backend: str) -> dict:
    """FP8 EP experts (D = 256, F = 128: the FP8 block size divides them): graph breaks, and the
    compiled outputs and gradients next to eager's."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    full = GroupedExperts(model_config(), GroupedOptions(), 8, 256, 128)
    for p in full.parameters():
        torch.nn.init.normal_(p, std=256**-0.5)
    full.set_grouped_gemm(FP8GroupedGemm(FP8Recipe(), "experts"))
    shard = EPExperts.from_full(full, ep_group)
    gen = torch.Generator().manual_seed(20 + rank)
    x_TD, weights_TK = torch.randn(32, 256, generator=gen), torch.rand(32, 2, generator=gen)
    indices_TK = torch.stack([torch.randperm(8, generator=gen)[:2] for _ in range(32)])

    def run(fn: Any) -> list[torch.Tensor]:
        shard.zero_grad(set_to_none=True)
        x = x_TD.clone().requires_grad_()
        y_TD = fn(x, weights_TK, indices_TK)
        y_TD.square().sum().backward()
        return [y_TD.detach(), x.grad, *(p.grad.clone() for p in shard.parameters())]

    with capture_scalar_outputs():
        breaks = torch._dynamo.explain(shard)(x_TD, weights_TK, indices_TK).graph_break_count
        torch._dynamo.reset()
        eager, compiled = run(shard), run(torch.compile(shard, fullgraph=True, backend=backend))
    return {"graph_breaks": breaks, "eager": eager, "compiled": compiled}


def main() -> None:
    rank, world, port, out, backend = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=timedelta(seconds=120)
    )
    ep_group, _ = new_ep_groups(ep_size=world)
    results = {name: compare(rank, ep_group, getattr(torch, name), backend) for name in sys.argv[6:]}
    results["fp8"] = fp8_experts_check(ep_group, rank, backend)
    torch.save(results, out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
