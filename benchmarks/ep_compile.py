"""EP MoE block under ``compile: block`` against eager: step time per rank, 2 CPU processes.

Two processes on gloo form one ep_group (EP = 2), one torch thread each. Both build the MoE block
of ``configs/model/small.yaml`` (MLA attention, aux-free routing over 16 experts top-4 + 1 shared,
D = 256, F = 128; seeded, so the same weights on both ranks) with its routed experts swapped for
``EPExperts`` shards (8 experts per rank); a copy is compiled as ``compile: block`` does
(``Block.compile``, inductor). Each rank feeds its own activations [B, T, D]; one step = the
block's forward and backward. Eager and compiled steps alternate in the same processes (same
machine load for both), after warm-up steps that include the compile. The clock is the process's
CPU time (``time.process_time``), which other jobs on a shared machine barely inflate; medians
over the steps, per rank. Also printed: the largest difference between eager and compiled outputs.

    python benchmarks/ep_compile.py [--batch 4 --seq 256 --steps 10 --dtypes float32 bfloat16]
"""

from __future__ import annotations

import argparse
import copy
import os
import socket
import statistics
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moeframe.inspect import load_model_config
from moeframe.model.context import ForwardContext
from moeframe.model.decoder import Block, build_decoder
from moeframe_parallel.ep_experts import replace_experts
from moeframe_parallel.expert_parallel import new_ep_groups

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "model" / "small.yaml"


def _step(block: Block, x_BTD: torch.Tensor, ctx: ForwardContext, timings: list[float]) -> torch.Tensor:
    dist.barrier()
    start = time.process_time()
    x = x_BTD.detach().requires_grad_()
    h, aux = block(x, ctx)
    (h.float().square().mean() + (aux if aux is not None else 0)).backward()
    timings.append(time.process_time() - start)
    return h.detach()


def _rank(rank: int, port: int, args: argparse.Namespace, queue) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)  # 2 processes on 2 cores: one core each
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2, timeout=timedelta(seconds=1800)
    )
    ep_group, _ = new_ep_groups(ep_size=2)
    cfg = load_model_config(CONFIG)
    for name in args.dtypes:
        dtype = getattr(torch, name)
        torch.manual_seed(0)
        eager = build_decoder(cfg).to(dtype).layers[cfg.first_k_dense]
        compiled = copy.deepcopy(eager)
        replace_experts(eager, ep_group)
        replace_experts(compiled, ep_group)
        compiled.compile()  # what runtime.compile: block does (inductor)
        gen = torch.Generator().manual_seed(100 + rank)  # each rank its own tokens
        x_BTD = torch.randn(args.batch, args.seq, cfg.dim, generator=gen).to(dtype)
        ctx = ForwardContext(torch.arange(args.seq), torch.zeros(args.batch, args.seq, dtype=torch.long), layer_id=1)
        start = time.perf_counter()
        for _ in range(args.warmup):
            _step(compiled, x_BTD, ctx, [])
            _step(eager, x_BTD, ctx, [])
        compile_s = time.perf_counter() - start
        t_eager: list[float] = []
        t_compiled: list[float] = []
        for _ in range(args.steps):
            y0 = _step(eager, x_BTD, ctx, t_eager)
            y1 = _step(compiled, x_BTD, ctx, t_compiled)
        diff = (y0.float() - y1.float()).abs().max().item()
        queue.put((name, rank, statistics.median(t_eager), statistics.median(t_compiled), diff, compile_s))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, port, args, queue)) for r in range(2)]
    for p in procs:
        p.start()
    rows = sorted(queue.get() for _ in range(2 * len(args.dtypes)))
    for p in procs:
        p.join()
    print(f"EP=2, MoE block of {CONFIG.name}, {args.batch} x {args.seq} tokens per rank, 1 thread per rank,")
    print(f"CPU time per forward+backward, median of {args.steps} alternating steps after {args.warmup} warm-up")
    print("| dtype | rank | eager ms | compiled ms | eager / compiled | max output diff | warm-up incl. compile s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, rank, te, tc, diff, compile_s in rows:
        print(f"| {name} | {rank} | {te * 1e3:.1f} | {tc * 1e3:.1f} | {te / tc:.2f}x | {diff:.2e} | {compile_s:.0f} |")


if __name__ == "__main__":
    main()
