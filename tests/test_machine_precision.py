"""``precision_by_machine`` (issue 23): a run's precision from this machine's measured GEMM rates;
the per-machine GEMM cache keyed by what changes a rate; the routed experts under autocast."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from moeframe.cli import build_cli
from moeframe.config import ConfigError
from moeframe.testing import TINY_RUN_FLAGS
from moeframe.training import machine_precision, throughput
from moeframe.training.machine_precision import BF16_MARGIN, choose_precision

from .conftest import REPO

TINY = str(REPO / "configs" / "pretrain" / "tiny.yaml")
CPU = torch.device("cpu")


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MOEFRAME_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv(machine_precision.INHERITED, "")  # restored (unset) after the test
    return tmp_path / "cache" / "peak_flops.json"


def _force_rates(cache: Path, bf16: float, fp32: float) -> None:
    """This machine's cache entries, as a measurement would have written them."""
    cache.parent.mkdir(parents=True, exist_ok=True)
    keys = {dtype: throughput._machine_key(CPU, dtype, 2048) for dtype in (torch.bfloat16, torch.float32)}
    cache.write_text(json.dumps({keys[torch.bfloat16]: bf16, keys[torch.float32]: fp32}))


def _no_measuring(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("measured although the cache holds this machine's rates")

    monkeypatch.setattr(throughput, "measure_gemm_peaks", fail)


def test_choice_from_a_real_measurement_is_cached_per_machine(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    choice = choose_precision(CPU)
    stored = json.loads(cache.read_text())
    rates = {k.split(" | ")[3]: v for k, v in stored.items()}
    assert set(rates) == {"bfloat16", "float32"} and all(v > 0 for v in rates.values())
    # the choice follows the stored side-by-side rates, whatever this machine is
    fast = rates["bfloat16"] >= BF16_MARGIN * rates["float32"]
    assert choice.precision == ("bf16-mixed" if fast else "32-true") and "measured now" in choice.why
    # the key names what changes a GEMM rate
    key = next(iter(stored))
    assert key.startswith("v2 | cpu: ") and f"{torch.get_num_threads()} threads" in key
    assert f"torch {torch.__version__}" in key and throughput.cpu_description() in key
    _no_measuring(monkeypatch)
    again = choose_precision(CPU)
    assert again.precision == choice.precision and "measured before" in again.why


@pytest.mark.parametrize(("bf16", "fp32", "expected"), [(700e9, 175e9, "bf16-mixed"), (150e9, 175e9, "32-true")])
def test_choice_from_cached_rates(
    cache: Path, monkeypatch: pytest.MonkeyPatch, bf16: float, fp32: float, expected: str
) -> None:
    _force_rates(cache, bf16, fp32)
    _no_measuring(monkeypatch)
    choice = choose_precision(CPU)
    assert choice.precision == expected
    assert f"{bf16 / fp32:.1f}x" in choice.why
    assert choose_precision(None).precision == "32-true"  # an accelerator the measurement does not cover


def test_the_gemm_cache_is_keyed_by_threads_and_drops_old_formats(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first cache was keyed by host name without the CPU model: its entries are not used
    (a VM moved to another CPU kept them) and are dropped when the file is written again."""
    cache.parent.mkdir(parents=True)
    old = "vm | cpu: x86_64 x2, 2 threads | torch 2.13.0+cpu | float32 | 2048^3"
    cache.write_text(json.dumps({old: 1.0}))
    measured: list[int] = []
    monkeypatch.setattr(
        throughput,
        "measure_gemm_peaks",
        lambda device, dtypes, size=2048: measured.append(torch.get_num_threads()) or dict.fromkeys(dtypes, 5.0),
    )
    threads = torch.get_num_threads()
    try:
        assert throughput.cached_gemm_peak(CPU, torch.float32) == (5.0, True)
        assert throughput.cached_gemm_peak(CPU, torch.float32) == (5.0, False)
        torch.set_num_threads(1 if threads != 1 else 2)
        assert throughput.cached_gemm_peak(CPU, torch.float32) == (5.0, True)  # another thread count
    finally:
        torch.set_num_threads(threads)
    stored = json.loads(cache.read_text())
    assert old not in stored and len(stored) == 2 and len(measured) == 2


def _trainer_precision(cache: Path, *args: str, config: str = TINY) -> str:
    cli = build_cli(
        args=["-c", config, "--trainer.default_root_dir", str(cache.parent.parent / "run"), *args], run=False
    )
    return str(cli.trainer.precision)


def test_explicit_precision_wins_and_configs_that_do_not_opt_in_keep_float32(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _force_rates(cache, 700e9, 175e9)  # a machine where bf16 is fast
    _no_measuring(monkeypatch)
    assert _trainer_precision(cache) == "bf16-mixed"  # the shipped tiny run opts in
    assert _trainer_precision(cache, "--trainer.precision", "32-true") == "32-true"
    assert _trainer_precision(cache, "--precision_by_machine", "false") == "32-true"
    # a run config that does not opt in keeps Lightning's default
    assert _trainer_precision(cache, config=str(REPO / "configs" / "pretrain" / "tiny-mla.yaml")) == "32-true"
    # a precision plugin is the run's precision: nothing is chosen beside it (Lightning refuses both)
    cli = build_cli(
        args=["-c", TINY, "--trainer.plugins", "fp8"]
        + ["--trainer.default_root_dir", str(cache.parent.parent / "run")],
        run=False,
    )
    assert type(cli.trainer.precision_plugin).__name__ != "MixedPrecision"


def test_a_pinned_or_inherited_choice_is_used_without_measuring(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _force_rates(cache, 700e9, 175e9)
    _no_measuring(monkeypatch)
    monkeypatch.setenv(machine_precision.INHERITED, "32-true")  # as the test suite pins it
    assert _trainer_precision(cache) == "32-true"
    monkeypatch.setenv("WORLD_SIZE", "2")  # a DDP rank Lightning launched: the first process's choice
    assert machine_precision.resolve_machine_precision("cpu", single_process=False).precision == "32-true"


@pytest.mark.bad_input
def test_ranks_started_by_another_launcher_must_name_the_precision(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="--trainer.precision"):
        machine_precision.resolve_machine_precision("cpu", single_process=False)


def test_a_tiny_run_records_the_chosen_precision(
    cache: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    _force_rates(cache, 700e9, 175e9)
    root = cache.parent.parent / "run"
    with caplog.at_level(logging.INFO):
        build_cli(
            args=["fit", "-c", TINY, "--trainer.default_root_dir", str(root)]
            + ["--trainer.max_steps", "2", *TINY_RUN_FLAGS],
        )
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("precision_by_machine:")]
    assert len(lines) == 1 and "bf16-mixed" in lines[0] and "4.0x" in lines[0]
    saved = next(root.glob("logs/version_*/config.yaml")).read_text()
    assert "precision: bf16-mixed" in saved  # the resolved choice is saved with the run
    ckpt = torch.load(root / "logs" / "version_0" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["state_dict"]  # it trained, in the chosen precision


class _GroupedMMDtypes(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[torch.dtype, torch.dtype]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func is torch.ops.aten._grouped_mm.default:
            self.seen.append((args[0].dtype, args[1].dtype))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("lora", [False, True], ids=["grouped", "lora"])
def test_routed_experts_follow_autocast(lora: bool) -> None:
    """Under bf16 autocast the grouped expert GEMMs run in bf16 (they stayed float32: autocast has
    no rule for grouped_mm), LoRA adapters on them too; the layer returns its input's dtype and
    float32 weight gradients."""
    from moeframe.config import ModelConfig
    from moeframe.model.experts import GroupedExperts, GroupedOptions
    from moeframe.model.lora import LoRAGroupedExperts

    torch.manual_seed(0)
    experts = GroupedExperts(ModelConfig(), GroupedOptions(), num_experts=4, dim=32, hidden_dim=64)
    for w in experts.parameters():
        torch.nn.init.normal_(w, std=0.1)
    if lora:  # rank 8: bf16 rows of 16 bytes, the grouped GEMM path; B nonzero so the adapters count
        experts = LoRAGroupedExperts(experts, rank=8, scale=2.0)
        for name in ("w1", "w2", "w3"):
            torch.nn.init.normal_(getattr(experts, f"{name}_lora_B"), std=0.1)
    x_TD = torch.randn(40, 32, requires_grad=True)
    indices_TK = torch.randint(0, 4, (40, 2))
    weights_TK = torch.rand(40, 2)
    with _GroupedMMDtypes() as plain:
        y_plain = experts(x_TD, weights_TK, indices_TK)
    with torch.autocast("cpu", dtype=torch.bfloat16), _GroupedMMDtypes() as mixed:
        y_mixed = experts(x_TD, weights_TK, indices_TK)
    assert plain.seen and all(d == (torch.float32, torch.float32) for d in plain.seen)
    assert mixed.seen and all(d == (torch.bfloat16, torch.bfloat16) for d in mixed.seen)
    assert y_mixed.dtype == torch.float32 and not torch.equal(y_mixed, y_plain)
    torch.testing.assert_close(y_mixed, y_plain, atol=3e-2, rtol=3e-2)
    y_mixed.square().sum().backward()
    trained = experts.w1_lora_A if lora else experts.w1
    assert trained.grad is not None and trained.grad.dtype == torch.float32 and x_TD.grad is not None
