"""optim.optimizer: muon — Muon for hidden matrices, AdamW for the rest, checked against torch's own
``torch.optim.Muon`` and ``torch.optim.AdamW`` step by step."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from moeframe.config import ConfigError, OptimConfig
from moeframe.training.optim import MuonAdamW, build_optimizer, make_optimizer, muon_param_groups


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
