"""One rank of test_ep_parity.py's 2-process gloo check (the underscore keeps pytest away).

Every rank builds the same decoder (seeded), and a reference copy of it. The copy keeps the
core's ``GroupedExperts`` (EP=1): it runs the WHOLE global batch (both ranks' sequences) in one
process, with the loss summed over the ranks' batches. The decoder under test gets its experts
swapped for ``EPExperts`` shards over a 2-rank ep_group and runs only this rank's sequences.
Saved: this rank's logits from both, the summed non-expert gradients, this rank's expert-shard
gradients and the reference's slice of them.

usage: python _ep_rank.py RANK WORLD_SIZE PORT OUT.pt
"""

from __future__ import annotations

import copy
import sys
from datetime import timedelta

import torch
import torch.distributed as dist

from moeframe.config import ModelConfig
from moeframe.model.decoder import build_decoder
from moeframe.training.balance import all_reduce_sum, moe_layers, synchronise_and_update
from moeframe_parallel.ep_experts import EPExperts, ep_modules, replace_experts
from moeframe_parallel.expert_parallel import new_ep_groups

SEQUENCES_PER_RANK, SEQ_LEN = 3, 16


def model_config() -> ModelConfig:
    # two MoE layers, 8 experts top-2, widths whose rows are 16-byte aligned (grouped GEMM path)
    return ModelConfig(
        vocab_size=64,
        dim=32,
        n_layers=3,
        first_k_dense=1,
        n_heads=4,
        dense_ffn_dim=64,
        moe_ffn_dim=16,
        n_routed_experts=8,
        n_activated_experts=2,
        n_shared_experts=1,
        max_seq_len=SEQ_LEN,
    )


def loss_of(decoder: torch.nn.Module, ids_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    logits = decoder(ids_BT[:, :-1]).logits
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids_BT[:, 1:].flatten())
    return logits, ce


def main() -> None:
    rank, world, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=timedelta(seconds=60)
    )
    torch.manual_seed(0)
    decoder = build_decoder(model_config())
    reference = copy.deepcopy(decoder)
    ids_RBT = torch.randint(0, 64, (world, SEQUENCES_PER_RANK, SEQ_LEN + 1), generator=torch.Generator().manual_seed(1))

    # reference, EP=1: every rank's batch, loss = sum of the per-rank mean losses
    ref_losses, ref_logits = [], []
    for r in range(world):
        logits, ce = loss_of(reference, ids_RBT[r])
        ref_logits.append(logits.detach())
        ref_losses.append(ce)
    torch.stack(ref_losses).sum().backward()

    # under test, EP=2: this rank's batch only
    ep_group, _ = new_ep_groups(ep_size=world)
    replace_experts(decoder, ep_group)
    logits, ce = loss_of(decoder, ids_RBT[rank])
    ce.backward()

    dense_grads, ref_dense_grads = {}, {}
    expert_names = {f"{n}.{w}" for n, _ in ep_modules(decoder) for w in ("w1", "w2", "w3")}
    for (name, p), (_, p_ref) in zip(decoder.named_parameters(), reference.named_parameters()):
        if name in expert_names:
            continue
        grad = p.grad.clone()
        dist.all_reduce(grad)  # sum over ranks = gradient of the summed loss
        dense_grads[name], ref_dense_grads[name] = grad, p_ref.grad
    expert_grads, ref_expert_grads = {}, {}
    ref_params = dict(reference.named_parameters())
    for name, module in ep_modules(decoder):
        assert isinstance(module, EPExperts)
        for w in ("w1", "w2", "w3"):
            expert_grads[f"{name}.{w}"] = getattr(module, w).grad
            ref_expert_grads[f"{name}.{w}"] = module.local_slice(ref_params[f"{name}.{w}"].grad)
    # the router-bias update's input: every layer's counts summed over the ranks (the balance
    # callback's own path) must be the counts of the whole global batch, as without EP
    counts_LE = synchronise_and_update(moe_layers(decoder), all_reduce_sum)
    ref_counts_LE = torch.stack([m.tokens_per_expert.double() for _, m in moe_layers(reference)])
    torch.save(
        {
            "counts": counts_LE,
            "ref_counts": ref_counts_LE,
            "logits": logits.detach(),
            "ref_logits": ref_logits[rank],
            "loss": ce.detach(),
            "ref_loss": ref_losses[rank].detach(),
            "dense": dense_grads,
            "ref_dense": ref_dense_grads,
            "experts": expert_grads,
            "ref_experts": ref_expert_grads,
        },
        out,
    )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
