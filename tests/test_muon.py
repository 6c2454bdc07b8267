"""optim.optimizer: muon — Muon for hidden matrices, AdamW for the rest, checked against torch's own
``torch.optim.Muon`` and ``torch.optim.AdamW`` step by step."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from moeframe.config import ConfigError, OptimConfig
from moeframe.training.optim import (
    MuonAdamW,
    build_optimizer,
    make_optimizer,
    muon_param_groups,
    newton_schulz,
    ns_coefficients,
)


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.proj = nn.Linear(8, 12)  # matrix + bias
        self.stack = nn.Parameter(torch.randn(3, 12, 8) * 0.1)  # experts stacked [E, F, D]
        self.norm = nn.Parameter(torch.ones(8))
        self.head = nn.Linear(8, 10, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        h = torch.relu(self.proj(x))
        h = h + torch.einsum("btf,efd->btd", h, self.stack).tanh().sum(-1, keepdim=True)
        return self.head(x * self.norm + h[..., :8])


def _grads(model: nn.Module, seed: int) -> None:
    torch.manual_seed(seed)
    model.zero_grad()
    ids = torch.randint(0, 10, (2, 5))
    model(ids).square().mean().backward()


def test_groups_put_hidden_matrices_under_muon_and_the_rest_under_adamw() -> None:
    model = Toy()
    muon, plain, head = muon_param_groups(model, 0.1)
    assert {id(p) for p in muon["params"]} == {id(model.proj.weight), id(model.stack)}
    assert {id(p) for p in plain["params"]} == {id(model.embed.weight), id(model.proj.bias), id(model.norm)}
    assert [id(p) for p in head["params"]] == [id(model.head.weight)]
    assert muon["use_muon"] and not plain["use_muon"] and not head["use_muon"]
    assert plain["weight_decay"] == 0.0 and head["weight_decay"] == 0.1


def test_muon_steps_equal_torch_muon_and_adamw_steps_equal_torch_adamw() -> None:
    torch.manual_seed(0)
    ours, ref = Toy(), Toy()
    ref.load_state_dict(ours.state_dict())
    lr, wd = 0.02, 0.1
    opt = MuonAdamW(muon_param_groups(ours, wd), lr=lr, betas=(0.9, 0.95), eps=1e-8)
    matrices = [ref.proj.weight]  # torch's Muon takes 2-D parameters only
    ref_muon = torch.optim.Muon(matrices, lr=lr, weight_decay=wd, adjust_lr_fn="match_rms_adamw")
    ref_adam = torch.optim.AdamW(
        [
            {"params": [ref.embed.weight, ref.proj.bias, ref.norm], "weight_decay": 0.0},
            {"params": [ref.head.weight], "weight_decay": wd},
        ],
        lr=lr,
        betas=(0.9, 0.95),
        eps=1e-8,
    )
    # the stack: torch's Muon on each expert's matrix separately
    ref_slices = [nn.Parameter(ref.stack[e].detach().clone()) for e in range(3)]
    ref_stack = torch.optim.Muon(ref_slices, lr=lr, weight_decay=wd, adjust_lr_fn="match_rms_adamw")
    for step in range(3):
        _grads(ours, step)
        _grads(ref, step)
        for e, s in enumerate(ref_slices):
            s.grad = ref.stack.grad[e].clone()
        opt.step()
        ref_muon.step(), ref_adam.step(), ref_stack.step()
        with torch.no_grad():
            ref.stack.copy_(torch.stack(list(ref_slices)))
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p, dict(ref.named_parameters())[name], rtol=1e-6, atol=1e-7, msg=name)
    assert not torch.allclose(ours.proj.weight, Toy().proj.weight)  # it moved


def test_build_optimizer_chooses_muon_from_the_config_and_keeps_the_schedule() -> None:
    model = Toy()
    opt, sched = build_optimizer(model, OptimConfig(optimizer="muon", lr=1e-3, warmup_steps=2), total_steps=10)
    assert isinstance(opt, MuonAdamW)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([5e-4] * 3)  # warm-up step 0 of 2
    assert isinstance(make_optimizer(model, OptimConfig()), torch.optim.AdamW)
    # a checkpoint round trip keeps the momentum
    _grads(model, 0)
    opt.step()
    again, _ = build_optimizer(model, OptimConfig(optimizer="muon"), total_steps=10)
    again.load_state_dict(opt.state_dict())
    assert torch.equal(
        again.state[model.proj.weight]["momentum_buffer"], opt.state[model.proj.weight]["momentum_buffer"]
    )


@pytest.mark.bad_input
def test_a_wrong_optimizer_name_fails_at_config_time() -> None:
    with pytest.raises(ConfigError, match="optim.optimizer must be adamw or muon"):
        OptimConfig(optimizer="sgd").validate()  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="muon_ns_steps"):
        OptimConfig(optimizer="muon", muon_ns_steps=0).validate()


def _spread(A: int, B: int, seed: int, smallest: float = 1e-2) -> torch.Tensor:
    """An [A, B] matrix whose singular values spread log-evenly from 1 down to ``smallest``."""
    gen = torch.Generator().manual_seed(seed)
    k = min(A, B)
    U, _ = torch.linalg.qr(torch.randn(A, k, generator=gen))
    V, _ = torch.linalg.qr(torch.randn(B, k, generator=gen))
    return U @ torch.diag(torch.logspace(0, math.log10(smallest), k)) @ V.T


@pytest.mark.parametrize("shape", [(64, 32), (32, 96), (48, 48)])
def test_v4_schedule_puts_singular_values_on_one_where_jordans_leaves_them_scattered(shape: tuple[int, int]) -> None:
    g = _spread(*shape, seed=sum(shape))
    v4 = torch.linalg.svdvals(newton_schulz(g, ns_coefficients("hybrid")).float())
    jordan = torch.linalg.svdvals(newton_schulz(g, ns_coefficients("jordan")).float())
    exact = torch.linalg.svdvals(torch.linalg.svd(g, full_matrices=False)[0])  # U of U S Vᵀ: all 1
    torch.testing.assert_close(exact, torch.ones_like(exact))
    # V4: 8 aggressive + 2 stabilising iterations land within bfloat16 rounding of 1 (measured 0.3-0.6%)
    assert (v4 - 1).abs().max() < 0.02, v4
    # Jordan's 5 leave them in roughly 0.68-1.2 (the iteration trades accuracy for speed)
    assert (jordan - 1).abs().max() > 0.15, jordan
    assert len(ns_coefficients("hybrid")) == 10 and ns_coefficients("jordan", 7) == ((3.4445, -4.775, 2.0315),) * 7


def test_the_schedule_named_in_the_config_is_the_one_muon_runs() -> None:
    torch.manual_seed(0)
    update = {}
    for schedule in ("jordan", "hybrid"):
        model = Toy()
        with torch.no_grad():
            model.proj.weight.zero_()
        opt = make_optimizer(model, OptimConfig(optimizer="muon", lr=1.0, weight_decay=0.0, muon_ns_schedule=schedule))
        model.proj.weight.grad = _spread(12, 8, seed=3)
        opt.step()
        update[schedule] = -model.proj.weight.detach().clone()
    # lr · rms · sqrt(max(A, B)) · NS(u), u = (1 - μ²) g: Nesterov's first step from a zero buffer
    nesterov = _spread(12, 8, seed=3) * (1 - 0.95**2)
    for schedule, got in update.items():
        want = 0.2 * math.sqrt(12) * newton_schulz(nesterov, ns_coefficients(schedule)).float()
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6, msg=schedule)
    assert not torch.allclose(update["jordan"], update["hybrid"], atol=1e-2)
    # the update RMS the config names: orthogonal rows of 8 columns scaled to rms 0.18 (V4's)
    model = Toy()
    opt = make_optimizer(
        model, OptimConfig(optimizer="muon", lr=1.0, weight_decay=0.0, muon_ns_schedule="hybrid", muon_update_rms=0.18)
    )
    before = model.proj.weight.detach().clone()
    model.proj.weight.grad = _spread(12, 8, seed=3)
    opt.step()
    rms = (model.proj.weight.detach() - before).square().mean().sqrt()
    assert abs(rms.item() - 0.18) < 0.002


def test_a_state_saved_before_schedules_existed_still_loads_and_steps() -> None:
    """Checkpoints written with the old optimizer groups (no ``ns_coefficients``) resume with the
    iteration they were trained with: ``ns_steps`` of Jordan's."""
    model = Toy()
    opt = make_optimizer(model, OptimConfig(optimizer="muon"))
    _grads(model, 0)
    opt.step()
    old = opt.state_dict()
    for group in old["param_groups"]:
        del group["ns_coefficients"]
    again = make_optimizer(model, OptimConfig(optimizer="muon", muon_ns_schedule="hybrid"))
    again.load_state_dict(old)
    assert "ns_coefficients" not in again.param_groups[0]
    before = model.proj.weight.detach().clone()
    _grads(model, 1)
    again.step()
    assert not torch.equal(model.proj.weight, before)
    # what an old config says still validates and builds: muon_ns_steps with the default schedule
    old_form = OptimConfig(optimizer="muon", muon_ns_steps=5)
    old_form.validate()
    groups = make_optimizer(model, old_form).param_groups
    assert groups[0]["ns_coefficients"] == [list(c) for c in ns_coefficients("jordan", 5)]


@pytest.mark.bad_input
def test_ns_steps_with_the_fixed_v4_schedule_is_refused_at_config_time() -> None:
    with pytest.raises(ConfigError, match="muon_ns_steps applies to muon_ns_schedule: jordan"):
        OptimConfig(optimizer="muon", muon_ns_schedule="hybrid", muon_ns_steps=5).validate()
    with pytest.raises(ConfigError, match="muon_ns_schedule must be jordan or hybrid"):
        OptimConfig(optimizer="muon", muon_ns_schedule="polar").validate()  # type: ignore[arg-type]
