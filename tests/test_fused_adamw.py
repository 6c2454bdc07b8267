"""optim.fused: AdamW's fused kernel, opt-in; the default loop (and its checkpoints) unchanged."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from moeframe.config import ConfigError, OptimConfig
from moeframe.training.optim import make_optimizer


class OpNames(TorchDispatchMode):
    """Records the names of the aten ops that run."""

    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.names.add(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Embedding(16, 8), nn.Linear(8, 12), nn.LayerNorm(12), nn.Linear(12, 16, bias=False))


def _train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        ids = torch.randint(0, 16, (4, 6), generator=gen)
        loss = nn.functional.cross_entropy(model(ids).flatten(0, 1), ids.flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def _max_diff(a: nn.Module, b: nn.Module) -> float:
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters(), strict=True))


def test_fused_adamw_runs_the_fused_kernel_and_matches_the_loop_within_rounding() -> None:
    loop_model, fused_model = _model(), _model()
    loop = make_optimizer(loop_model, OptimConfig(lr=1e-2))
    fused = make_optimizer(fused_model, OptimConfig(lr=1e-2, fused=True))
    _train(loop_model, loop, 3)
    with OpNames() as ops:
        _train(fused_model, fused, 3)
    assert "_fused_adamw_" in ops.names  # the fused kernel ran, not the loop
    with OpNames() as loop_ops:
        _train(_model(), make_optimizer(_model(), OptimConfig(lr=1e-2)), 1)
    assert "_fused_adamw_" not in loop_ops.names
    assert 0 < _max_diff(loop_model, _model()) and _max_diff(loop_model, fused_model) < 1e-6


def test_the_default_optimizer_groups_are_unchanged() -> None:
    """Off (the default), the groups say ``fused: None`` as before the option: checkpoints saved
    before and after it hold the same optimizer state."""
    groups = make_optimizer(_model(), OptimConfig()).param_groups
    assert [g["fused"] for g in groups] == [None] * len(groups)


@pytest.mark.parametrize("saved_fused", [False, True])
def test_resuming_keeps_the_configured_implementation(saved_fused: bool) -> None:
    """A checkpoint's param groups carry ``fused``; loading it must not switch the run's choice."""
    saver_model = _model()
    saver = make_optimizer(saver_model, OptimConfig(lr=1e-2, fused=saved_fused))
    _train(saver_model, saver, 2)
    saved = copy.deepcopy(saver.state_dict())  # as read from a checkpoint file: nothing shared
    for fused in (False, True):
        model = _model()
        model.load_state_dict(saver_model.state_dict())
        optimizer = make_optimizer(model, OptimConfig(lr=1e-2, fused=fused))
        optimizer.load_state_dict(copy.deepcopy(saved))
        assert all(g["fused"] == (fused or None) for g in optimizer.param_groups)
        with OpNames() as ops:
            _train(model, optimizer, 1, seed=5)
        assert ("_fused_adamw_" in ops.names) == fused
        reference_model = _model()
        reference_model.load_state_dict(saver_model.state_dict())
        reference = make_optimizer(reference_model, OptimConfig(lr=1e-2, fused=saved_fused))
        reference.load_state_dict(copy.deepcopy(saved))
        _train(reference_model, reference, 1, seed=5)
        assert _max_diff(model, reference_model) < 1e-6  # the resumed moments and step counts were used


@pytest.mark.bad_input
def test_fused_with_muon_or_not_a_bool_is_one_config_error() -> None:
    with pytest.raises(ConfigError, match="optim.fused applies to optimizer: adamw only"):
        OptimConfig(optimizer="muon", fused=True).validate()
    with pytest.raises(ConfigError, match="optim.fused must be true or false"):
        OptimConfig(fused="yes").validate()  # type: ignore[arg-type]
