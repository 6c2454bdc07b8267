"""The shared set-up of test_auxfree_bias.py, and one data-parallel rank of its 2-process test
when run as a script (the leading underscore keeps pytest from collecting it).

Builds the same 2-MoE-layer decoder as every other rank, routes its share of each global batch
through the MoE layers in two micro-batches, then runs the balance callback's once-per-step update
(``synchronise_and_update``) over a real gloo process group. Saves the biases after each step,
the gate weights and how many collectives one update issued.

usage: python _gloo_rank.py RANK WORLD_SIZE PORT OUT.pt
"""

from __future__ import annotations

import sys
from datetime import timedelta

import torch
import torch.distributed as dist

from moeframe.config import ModelConfig
from moeframe.model.decoder import Decoder, build_decoder
from moeframe.training.balance import all_reduce_sum, moe_layers, synchronise_and_update

STEPS = 2
GAMMA = 0.01
DIM, EXPERTS, TOP_K, GROUPS, KEPT = 16, 8, 2, 4, 2
SEQUENCES, SEQ_LEN = 8, 6  # one global batch: 8 sequences = 2 ranks x 2 micro-batches x 2


def model_config() -> ModelConfig:
    """Two MoE layers (layers 1 and 2) with the aux-free router, group-limited routing."""
    return ModelConfig(
        vocab_size=32,
        dim=DIM,
        n_layers=3,
        first_k_dense=1,
        n_heads=2,
        dense_ffn_dim=32,
        moe_ffn_dim=8,
        n_routed_experts=EXPERTS,
        n_activated_experts=TOP_K,
        n_shared_experts=0,
        n_expert_groups=GROUPS,
        n_limited_groups=KEPT,
        route_scale=2.5,
        max_seq_len=SEQ_LEN,
        router={"name": "aux_free", "bias_update_speed": GAMMA, "seq_aux_loss_coef": 0.0},
    )


def build_model() -> Decoder:
    """The same weights in every process: seeded build, then gate weights wide enough that the
    affinities differ by more than the bias steps."""
    torch.manual_seed(0)
    decoder = build_decoder(model_config())
    with torch.no_grad():
        for _, moe in moe_layers(decoder):
            moe.gate.weight.normal_(0.0, 0.3)
    return decoder


def global_batch(step: int) -> torch.Tensor:
    """Inputs of each MoE layer for one optimizer step, [layers=2, SEQUENCES, SEQ_LEN, DIM]."""
    generator = torch.Generator().manual_seed(100 + step)
    return torch.randn(2, SEQUENCES, SEQ_LEN, DIM, generator=generator)


def main(rank: int, world_size: int, port: int, out: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size, timeout=timedelta(seconds=60)
    )
    layers = moe_layers(build_model())
    calls = []

    def counted_all_reduce(counts_LE: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(counts_LE.shape))
        return all_reduce_sum(counts_LE)

    biases = []
    with torch.no_grad():
        for step in range(STEPS):
            shard_LBTD = global_batch(step).chunk(world_size, dim=1)[rank]
            for micro_LBTD in shard_LBTD.chunk(2, dim=1):  # gradient accumulation: 2 micro-batches
                for (_, moe), x_BTD in zip(layers, micro_LBTD):
                    moe(x_BTD)
            synchronise_and_update(layers, counted_all_reduce)
            biases.append(torch.stack([m.gate.e_score_correction_bias.clone() for _, m in layers]))
    torch.save(
        {
            "biases": torch.stack(biases),
            "calls": calls,
            "weights": torch.stack([m.gate.weight.detach() for _, m in layers]),
        },
        out,
    )
    dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
