"""EP dispatch: what the all-to-all costs against the expert computation it distributes.

Two CPU processes on gloo form one ep_group (EP = 2); each holds 4 of the tiny model's 8
routed experts and routes its own micro-batch (configs/model/tiny.yaml widths: D = 128,
F = 128, top-2; 16 x 256 tokens per rank as in configs/pretrain/tiny.yaml). One MoE forward
under EP is timed phase by phase, with the same code as ``EPExperts.forward``:

- counts: the all-to-all of per-expert token counts (E integers) that sizes the splits;
- dispatch: the all-to-all of the routed rows (T·K x D);
- experts: the SwiGLU grouped GEMMs over the received rows (this rank's 4 experts);
- combine: the reverse all-to-all of the expert outputs;

plus, for reference, the whole layer on one process without EP (all 8 experts, one rank's
tokens). Medians over repeats, forward only, float32. On a CPU the "network" is loopback TCP,
so the ratio says how the dispatcher's overhead compares on this machine, not on NVLink/IB.

    python benchmarks/ep_dispatch.py [--tokens 4096 --repeats 30]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed._functional_collectives import all_to_all_single

from moeframe.config import ModelConfig
from moeframe.model.experts import GroupedExperts, GroupedOptions
from moeframe_parallel.ep_experts import EPExperts, expert_ffn
from moeframe_parallel.expert_parallel import new_ep_groups

DIM, HIDDEN, EXPERTS, TOP_K = 128, 128, 8, 2


def _timed(fn, timings: list[float]):
    dist.barrier()
    start = time.perf_counter()
    out = fn()
    out = out.wait() if hasattr(out, "wait") else out
    timings.append(time.perf_counter() - start)
    return out


def _rank(rank: int, world: int, port: int, tokens: int, repeats: int, queue) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)  # 2 processes on 2 cores: one core each
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=timedelta(seconds=120)
    )
    torch.manual_seed(0)
    config = ModelConfig(dim=DIM, moe_ffn_dim=HIDDEN, n_routed_experts=EXPERTS, n_activated_experts=TOP_K)
    full = GroupedExperts(config, GroupedOptions(), EXPERTS, DIM, HIDDEN)
    for w in (full.w1, full.w2, full.w3):
        torch.nn.init.normal_(w, std=0.02)
    ep_group, _ = new_ep_groups(world)
    shard = EPExperts.from_full(full, ep_group)
    gen = torch.Generator().manual_seed(100 + rank)
    phases: dict[str, list[float]] = {k: [] for k in ("counts", "dispatch", "experts", "combine", "no_ep_layer")}
    with torch.no_grad():
        for i in range(repeats + 3):  # the first 3 are warm-up
            x_TD = torch.randn(tokens, DIM, generator=gen)
            indices_TK = torch.rand(tokens, EXPERTS, generator=gen).topk(TOP_K, dim=-1).indices
            weights_TK = torch.full((tokens, TOP_K), 1.0 / TOP_K)
            t = {k: [] for k in phases}
            order_N = indices_TK.flatten().argsort(stable=True)
            counts_E = torch.bincount(indices_TK.flatten(), minlength=EXPERTS)
            x_ND = x_TD[order_N // TOP_K]
            recv_RE = _timed(lambda: shard._exchange_counts(counts_E), t["counts"])
            send = counts_E.view(world, -1).sum(1).tolist()
            recv = recv_RE.sum(1).tolist()
            x_RD = _timed(lambda: all_to_all_single(x_ND, recv, send, ep_group), t["dispatch"])
            local_R = torch.repeat_interleave(torch.arange(shard.num_local_experts).repeat(world), recv_RE.flatten())
            by_expert = local_R.argsort(stable=True)
            y_RD = _timed(
                lambda: expert_ffn(x_RD[by_expert], shard.w1, shard.w2, shard.w3, recv_RE.sum(0)), t["experts"]
            )
            _timed(lambda: all_to_all_single(y_RD, send, recv, ep_group), t["combine"])
            _timed(lambda: full(x_TD, weights_TK, indices_TK), t["no_ep_layer"])
            if i >= 3:
                for k in phases:
                    phases[k] += t[k]
    medians = {k: statistics.median(v) * 1e3 for k, v in phases.items()}
    gathered = [None] * world
    dist.all_gather_object(gathered, medians)
    if rank == 0:
        queue.put(gathered)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=16 * 256, help="tokens per rank per forward")
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    mp.spawn(_rank, args=(2, port, args.tokens, args.repeats, queue), nprocs=2, join=True)
    per_rank = queue.get()
    ms = {k: max(r[k] for r in per_rank) for k in per_rank[0]}  # the slower rank sets the pace
    a2a = ms["counts"] + ms["dispatch"] + ms["combine"]
    print(
        f"EP dispatch, tiny config (D={DIM}, F={HIDDEN}, E={EXPERTS}, top-{TOP_K}), EP=2 over 2 CPU processes "
        f"(gloo, 1 thread each), {args.tokens} tokens per rank, forward, float32, median of {args.repeats}"
    )
    print(f"{'phase':<34}{'ms':>9}")
    for name, label in (
        ("counts", "all-to-all of counts"),
        ("dispatch", "all-to-all dispatch (T*K x D)"),
        ("experts", "expert compute (4 local experts)"),
        ("combine", "all-to-all combine"),
        ("no_ep_layer", "no EP: 8 experts, one process"),
    ):
        print(f"{label:<34}{ms[name]:>9.2f}")
    print(f"{'all-to-all total':<34}{a2a:>9.2f}")
    print(f"all-to-all / expert compute = {a2a / ms['experts']:.2f}")


if __name__ == "__main__":
    main()
