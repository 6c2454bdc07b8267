"""Idle fraction of each pipeline schedule, measured on CPU processes, against the analytic bubble.

``python benchmarks/pipeline_bubble.py [--pp 2] [--microbatches 8] [--steps 5]``

Each of ``pp`` processes (gloo, one thread each) runs its stages of a stack of equal MLP blocks
under every schedule of the ``pp`` strategy (``torch.distributed.pipelining``). Per rank:
``busy`` = the time its stages take for the step's forwards and backwards run back to back with no
pipeline (measured on the same process, same micro-batches), ``step`` = the schedule's wall time
per step (median over ``--steps`` after a warm-up); idle = 1 − busy / step, the mean over ranks.
The analytic bubble (``moeframe_parallel.pipeline_layout.bubble_fraction``) assumes F = B_input =
W per stage and free communication; measured idle adds message latency and the CPU's noise
(on a shared machine, run it when it is quiet).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from moeframe_parallel.pipeline_layout import SCHEDULES, bubble_fraction, default_vpp, stage_ranks, torch_refuses

DIM, LAYERS_PER_RANK, MICRO_BATCH, TOKENS = 256, 4, 4, 64


def stage_module(layers: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        *(nn.Sequential(nn.Linear(DIM, 4 * DIM), nn.GELU(), nn.Linear(4 * DIM, DIM)) for _ in range(layers))
    )


def loss_fn(y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (y - target).pow(2).mean()


def busy_seconds(modules: list[nn.Module], microbatches: int) -> float:
    """This rank's compute for one step with nothing to wait for: every stage's forward and backward."""
    x = torch.randn(MICRO_BATCH * TOKENS, DIM)
    start = time.perf_counter()
    for _ in range(microbatches):
        for m in modules:
            m(x.requires_grad_()).sum().backward()
    return time.perf_counter() - start


def measure(schedule: str, pp: int, microbatches: int, steps: int, rank: int) -> float:
    from torch.distributed import pipelining

    vpp = default_vpp(schedule)
    mine = [s for s, r in enumerate(stage_ranks(pp, vpp, schedule)) if r == rank]
    modules = [stage_module(LAYERS_PER_RANK // vpp, s) for s in mine]
    stages = [pipelining.PipelineStage(m, s, pp * vpp, torch.device("cpu")) for m, s in zip(modules, mine)]
    cls = getattr(pipelining, SCHEDULES[schedule].torch_class)
    sched = cls(stages[0] if vpp == 1 else stages, n_microbatches=microbatches, loss_fn=loss_fn)
    x = torch.randn(microbatches * MICRO_BATCH * TOKENS, DIM)
    target = torch.randn_like(x)
    times = []
    for step in range(steps + 1):
        dist.barrier()
        start = time.perf_counter()
        sched.step(x if 0 in mine else None, target=target if pp * vpp - 1 in mine else None, return_outputs=False)
        if step:  # the first step also learns the shapes
            times.append(time.perf_counter() - start)
    busy = statistics.median(busy_seconds(modules, microbatches) for _ in range(3))
    return 1.0 - busy / statistics.median(times)


def schedules_this_torch_runs() -> list[str]:
    """The ``pp`` strategy's schedules, less those this torch cannot run (a printed line for each:
    the same refusal the strategy gives at config time, not a traceback from a worker)."""
    runnable = []
    for schedule in SCHEDULES:
        refused = torch_refuses(schedule)
        if refused:
            print(f"skipped: {refused}")
        else:
            runnable.append(schedule)
    return runnable


def worker(rank: int, pp: int, port: int, microbatches: int, steps: int, schedules: list[str], queue: mp.Queue) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=pp)
    for schedule in schedules:
        idle = torch.tensor([measure(schedule, pp, microbatches, steps, rank)])
        dist.all_reduce(idle)
        if rank == 0:
            queue.put((schedule, float(idle) / pp))
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pp", type=int, default=2)
    p.add_argument("--microbatches", type=int, default=8)
    p.add_argument("--steps", type=int, default=5)
    args = p.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    schedules = schedules_this_torch_runs()
    queue = mp.get_context("spawn").Queue()
    mp.spawn(worker, args=(args.pp, port, args.microbatches, args.steps, schedules, queue), nprocs=args.pp)
    print(f"pp={args.pp}, {args.microbatches} micro-batches, {LAYERS_PER_RANK} MLP blocks of dim {DIM} per rank")
    print(f"{'schedule':<18} {'vpp':>3} {'analytic bubble':>16} {'measured idle':>14}")
    while not queue.empty():
        schedule, idle = queue.get()
        vpp = default_vpp(schedule)
        print(
            f"{schedule:<18} {vpp:>3} {bubble_fraction(schedule, args.pp, args.microbatches, vpp):>15.1%} {idle:>13.1%}"
        )


if __name__ == "__main__":
    main()
