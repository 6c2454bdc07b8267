"""The bias rule ``b ← b + γ·sign(mean(c) − c)``: a hand-worked update, the γ schedule, gradient
accumulation (micro-batches sum to the batch) and two real gloo ranks (one all-reduce, identical
biases, equal to one process on the union of the data). Reference counts come from HF
transformers' DeepSeek-V3 router, not from the code under test."""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from transformers import DeepseekV3Config
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

from moeframe.config import resolve_model_config
from moeframe.training.balance import moe_layers, synchronise_and_update
from moeframe_auxfree import AuxFreeRouter

HERE = Path(__file__).parent
_spec = importlib.util.spec_from_file_location("_gloo_rank", HERE / "_gloo_rank.py")
setup = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(setup)


def _router(**options) -> AuxFreeRouter:
    cfg = setup.model_config()
    cfg.router = {"name": "aux_free", **options}
    return AuxFreeRouter(cfg, resolve_model_config(cfg).router.options)


# -- the rule by hand --------------------------------------------------------------------------------
def test_hand_worked_update_and_schedule():
    # 8 experts, c = [10, 2, 6, 6, 6, 6, 6, 6]: mean 6, so expert 0 is over (-γ), expert 1 under (+γ),
    # the rest exactly at the mean (sign 0: no move). γ = 0.001 for the first update, 0.01 from
    # update 1 on, 0 from update 2 on.
    router = _router(bias_update_speed=0.001, bias_update_schedule=[[1, 0.01], [2, 0.0]])
    counts = torch.tensor([10, 2, 6, 6, 6, 6, 6, 6])
    router.update_after_step(counts)
    assert torch.allclose(router.e_score_correction_bias[:3], torch.tensor([-0.001, 0.001, 0.0]), atol=0, rtol=1e-6)
    router.update_after_step(counts)
    assert torch.allclose(router.e_score_correction_bias[:3], torch.tensor([-0.011, 0.011, 0.0]), atol=0, rtol=1e-6)
    router.update_after_step(counts)  # γ = 0: the bias is frozen
    assert torch.allclose(router.e_score_correction_bias[:3], torch.tensor([-0.011, 0.011, 0.0]), atol=0, rtol=1e-6)
    assert torch.all(router.e_score_correction_bias[2:] == 0)
    assert int(router.num_bias_updates) == 3
    assert router.e_score_correction_bias.grad is None and not router.e_score_correction_bias.requires_grad


# -- a reference from HF transformers -------------------------------------------------------------------
def reference_biases(weights_LED: torch.Tensor, steps: int) -> torch.Tensor:
    """Biases after each step when ONE process routes every global batch with HF's router."""
    cfg = DeepseekV3Config(
        hidden_size=setup.DIM,
        n_routed_experts=setup.EXPERTS,
        num_experts_per_tok=setup.TOP_K,
        n_group=setup.GROUPS,
        topk_group=setup.KEPT,
        routed_scaling_factor=2.5,
    )
    routers = [DeepseekV3TopkRouter(cfg) for _ in weights_LED]
    bias_LE = torch.zeros(len(routers), setup.EXPERTS)
    history = []
    with torch.no_grad():
        for router, w_ED in zip(routers, weights_LED):
            router.weight.copy_(w_ED)
        for step in range(steps):
            for layer, (router, x_BTD) in enumerate(zip(routers, setup.global_batch(step))):
                router.e_score_correction_bias.copy_(bias_LE[layer])
                _, _, indices = router(x_BTD)
                c_E = torch.bincount(indices.flatten(), minlength=setup.EXPERTS).float()
                bias_LE[layer] += setup.GAMMA * torch.sign(c_E.mean() - c_E)
            history.append(bias_LE.clone())
    return torch.stack(history)


def test_two_micro_batches_update_like_one_batch_of_both():
    whole, accumulated = moe_layers(setup.build_model()), moe_layers(setup.build_model())
    x_LBTD = setup.global_batch(0)
    with torch.no_grad():
        for (_, moe), x_BTD in zip(whole, x_LBTD):
            moe(x_BTD)
        for micro_LBTD in x_LBTD.chunk(2, dim=1):
            for (_, moe), x_BTD in zip(accumulated, micro_LBTD):
                moe(x_BTD)
    counts_whole = synchronise_and_update(whole, lambda t: t)
    counts_accumulated = synchronise_and_update(accumulated, lambda t: t)
    assert torch.equal(counts_whole, counts_accumulated)
    assert counts_whole.sum() == 2 * setup.SEQUENCES * setup.SEQ_LEN * setup.TOP_K  # 2 layers
    expected = reference_biases(torch.stack([m.gate.weight.detach() for _, m in whole]), steps=1)[0]
    for layers in (whole, accumulated):
        assert torch.equal(torch.stack([m.gate.e_score_correction_bias for _, m in layers]), expected)
        assert all(int(m.tokens_per_expert.sum()) == 0 for _, m in layers)  # reset for the next step
    assert expected.abs().sum() > 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _clean_env() -> dict[str, str]:
    cluster = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK"}
    env = {k: v for k, v in os.environ.items() if k not in cluster and not k.startswith("SLURM_")}
    env.update(PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return env


def test_two_gloo_ranks_end_with_identical_biases_equal_to_one_process_on_the_union(tmp_path):
    port, world = _free_port(), 2
    outs = [tmp_path / f"rank{r}.pt" for r in range(world)]
    procs = [
        subprocess.Popen(
            [sys.executable, str(HERE / "_gloo_rank.py"), str(r), str(world), str(port), str(outs[r])],
            env=_clean_env(),
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(world)
    ]
    try:
        logs = [p.communicate(timeout=120)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)
    rank0, rank1 = (torch.load(o) for o in outs)
    # one collective per optimizer step, carrying every layer's counts at once
    assert rank0["calls"] == [(2, setup.EXPERTS)] * setup.STEPS
    assert torch.equal(rank0["weights"], rank1["weights"])
    assert torch.equal(rank0["biases"], rank1["biases"])
    expected = reference_biases(rank0["weights"], setup.STEPS)
    assert torch.equal(rank0["biases"], expected)
    assert not torch.equal(expected[1], expected[0])  # the second step moved the bias again
