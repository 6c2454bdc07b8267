"""Performance features: the throughput/MFU callback, activation checkpointing, torch.compile per
block, and the fast paths, each checked against its reference; the benchmarks run in smoke mode.

No wall-clock assertion: timings are the benchmarks' business (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader

from moeframe.config import ConfigError, ModelConfig, RuntimeConfig
from moeframe.model.context import ForwardContext
from moeframe.model.decoder import Decoder, build_decoder
from moeframe.model.experts import grouped_mm_op
from moeframe.model.router import count_per_expert
from moeframe.training.pretrain import PretrainModule
from moeframe.training.throughput import PEAK_FLOPS, ModelThroughput, gpu_family, precision_of

from .conftest import REPO, clean_env

MLA = dict(name="mla", q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=8)
COMBOS = {
    "mha+topk+grouped": (dict(name="mha"), dict(name="topk")),
    "mla+aux_free+grouped": (MLA, dict(name="aux_free")),
}


def tiny(attention: dict, router: dict, **changes: Any) -> ModelConfig:
    base = dict(
        vocab_size=64,
        dim=32,
        n_layers=3,
        n_heads=2,
        dense_ffn_dim=64,
        moe_ffn_dim=16,
        n_routed_experts=4,
        n_activated_experts=2,
        n_expert_groups=2,
        n_limited_groups=2,
        attention=attention,
        router=router,
    )
    return ModelConfig(**{**base, **changes})


# -- the throughput callback ----------------------------------------------------------------------
class RandomTokens(L.LightningDataModule):
    def __init__(self, vocab: int, batch: int, seq: int, n: int = 64) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, vocab, (n, seq + 1), generator=g)
        self.batch = batch

    def train_dataloader(self) -> DataLoader:
        rows = [{"input_ids": r[:-1], "labels": r[1:]} for r in self.ids]
        return DataLoader(rows, batch_size=self.batch)


def hand_flops_per_token(cfg: ModelConfig, seq: int) -> int:
    """Training FLOPs per token written out from the config (MHA, no MTP): 6 x the matmul weights
    a token passes through, plus the causal attention core (QKᵀ and PV over T/2 keys on average)."""
    D, H, E, K = cfg.dim, cfg.n_heads, cfg.n_routed_experts, cfg.n_activated_experts
    attention = 4 * D * D  # wq, wk, wv, wo
    dense = 3 * D * cfg.dense_ffn_dim
    moe = E * D + (K + cfg.n_shared_experts) * 3 * D * cfg.moe_ffn_dim  # router + chosen and shared experts
    n_moe = cfg.n_layers - cfg.first_k_dense
    weights = cfg.n_layers * attention + cfg.first_k_dense * dense + n_moe * moe + D * cfg.vocab_size
    core = cfg.n_layers * 6 * H * (2 * D // H) * seq // 2
    return 6 * weights + core


def _metrics(log_dir: Path) -> list[dict[str, str]]:
    with open(log_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


def test_throughput_logs_tokens_flops_mfu_and_breakdown(tmp_path: Path) -> None:
    cfg = tiny(dict(name="mha"), dict(name="topk"), mtp_depth=0)
    batch, seq, accumulate, peak = 4, 16, 2, 1e12
    module = PretrainModule(cfg)
    callback = ModelThroughput(peak_flops=peak, window=1, breakdown_every_n_steps=2)
    logger = CSVLogger(tmp_path, name="run")
    trainer = L.Trainer(
        max_steps=4,
        accumulate_grad_batches=accumulate,
        logger=logger,
        callbacks=[callback],
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
    )
    trainer.fit(module, datamodule=RandomTokens(cfg.vocab_size, batch, seq))
    rows = [r for r in _metrics(Path(logger.log_dir)) if r.get("perf/tokens_per_sec")]
    assert len(rows) == 4  # one row per optimizer step
    tokens_per_step = batch * seq * accumulate
    flops_per_token = hand_flops_per_token(cfg, seq)
    for r in rows:
        step_s, tps = float(r["perf/step_time_s"]), float(r["perf/tokens_per_sec"])
        assert tps * step_s == pytest.approx(tokens_per_step, rel=1e-6)
        assert float(r["perf/tokens_per_sec_per_device"]) == pytest.approx(tps)
        flops = float(r["perf/model_flops_per_sec_per_device"])
        assert flops / tps == pytest.approx(flops_per_token, rel=1e-6)
        assert float(r["perf/mfu"]) == pytest.approx(flops / peak, rel=1e-6)
    broken_down = [int(r["step"]) for r in rows if r.get("perf/time/forward_ms")]
    assert broken_down == [0, 2]  # every 2nd optimizer step (logged at the step it ended)
    for r in rows:
        if not r.get("perf/time/forward_ms"):
            continue
        parts = {k.split("/")[-1]: float(v) for k, v in r.items() if k.startswith("perf/time/") and v}
        assert {
            "forward_ms",
            "backward_ms",
            "optimizer_ms",
            "forward_attention_ms",
            "forward_router_ms",
            "forward_moe_dispatch_ms",
            "forward_moe_experts_ms",
            "forward_shared_experts_ms",
        } <= set(parts)
        inside = sum(v for k, v in parts.items() if k.startswith("forward_") and k != "forward_ms")
        assert 0 < inside <= parts["forward_ms"]
        assert (
            sum(parts[k] for k in ("forward_ms", "backward_ms", "optimizer_ms")) <= float(r["perf/step_time_s"]) * 1e3
        )
    # nothing of the breakdown stays installed between breakdown steps
    from moeframe.model.base import ExpertsBase

    assert all(m.phase_timer is None for m in module.decoder.modules() if isinstance(m, ExpertsBase))
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in module.decoder.modules())


def _fit_with_throughput(
    tmp_path: Path, callback: ModelThroughput, precision: str = "bf16-true"
) -> list[dict[str, str]]:
    cfg = tiny(dict(name="mha"), dict(name="topk"), n_layers=2)
    logger = CSVLogger(tmp_path, name="run")
    trainer = L.Trainer(
        max_steps=2,
        logger=logger,
        callbacks=[callback],
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
        precision=precision,
    )
    trainer.fit(PretrainModule(cfg), datamodule=RandomTokens(cfg.vocab_size, 2, 8))
    return [r for r in _metrics(Path(logger.log_dir)) if r.get("perf/tokens_per_sec")]


def test_cpu_mfu_against_a_measured_peak_cached_per_machine(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """No built-in peak on a CPU: the callback measures a GEMM peak in the run's dtype once, caches
    it, says so in one info line, and logs MFU = model FLOP/s / that peak."""
    from moeframe.training import throughput

    monkeypatch.setenv("MOEFRAME_CACHE", str(tmp_path / "cache"))
    measured: list[torch.dtype] = []
    real = throughput.measure_gemm_peaks
    monkeypatch.setattr(
        throughput,
        "measure_gemm_peaks",
        lambda device, dtypes, size=2048: measured.extend(dtypes) or real(device, dtypes, 256),
    )
    with caplog.at_level("INFO"):
        rows = _fit_with_throughput(tmp_path / "a", ModelThroughput(window=2))
    assert measured == [torch.bfloat16]  # bf16-true: the run's GEMMs are bf16
    cache = json.loads((tmp_path / "cache" / "peak_flops.json").read_text())
    ((key, peak),) = cache.items()
    assert "bfloat16" in key and peak > 0
    assert any("measured peak" in r.message and "measured now" in r.message for r in caplog.records)
    for r in rows:
        assert float(r["perf/mfu"]) == pytest.approx(float(r["perf/model_flops_per_sec_per_device"]) / peak, rel=1e-6)
    # the second run on this machine reads the cache instead of measuring again
    caplog.clear()
    with caplog.at_level("INFO"):
        rows = _fit_with_throughput(tmp_path / "b", ModelThroughput(window=2))
    assert measured == [torch.bfloat16] and rows and all(r["perf/mfu"] for r in rows)
    assert any("measured before" in r.message for r in caplog.records)
    # float32 is a different peak: measured and cached beside the bf16 one
    _fit_with_throughput(tmp_path / "c", ModelThroughput(window=2), precision="32-true")
    assert measured == [torch.bfloat16, torch.float32]
    assert len(json.loads((tmp_path / "cache" / "peak_flops.json").read_text())) == 2


def test_measuring_the_peak_leaves_the_run_rng_alone() -> None:
    """A run that measures (empty cache) and its resumed twin (cache filled) must draw the same random
    numbers afterwards: the measurement uses a private generator (it broke bit-exact DDP resume)."""
    from moeframe.training import throughput

    torch.manual_seed(7)
    before = torch.get_rng_state()
    assert throughput.measure_gemm_peak(torch.device("cpu"), torch.float32, size=64, repeats=1) > 0
    assert torch.equal(torch.get_rng_state(), before)


def test_measure_peak_false_logs_no_mfu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOEFRAME_CACHE", str(tmp_path / "cache"))
    rows = _fit_with_throughput(tmp_path, ModelThroughput(window=2, measure_peak=False))
    assert rows and all(r["perf/model_flops_per_sec_per_device"] for r in rows)
    assert "perf/mfu" not in rows[0] and not (tmp_path / "cache").exists()


def test_peak_table_and_precision_detection() -> None:
    from lightning.pytorch.plugins.precision import HalfPrecision, MixedPrecision, Precision

    assert gpu_family("NVIDIA H200") == "h200" and gpu_family("NVIDIA B200") == "b200"
    assert gpu_family("NVIDIA H100 80GB HBM3") == "h100-sxm"
    assert gpu_family("NVIDIA H100 PCIe") is None and gpu_family("NVIDIA A100-SXM4-80GB") is None
    assert PEAK_FLOPS[("h200", "bf16")] == 989.4e12 and PEAK_FLOPS[("h200", "fp8")] == 1978.9e12
    assert PEAK_FLOPS[("b200", "fp8")] == 2 * PEAK_FLOPS[("b200", "bf16")]
    assert precision_of(HalfPrecision("bf16-true")) == "bf16"
    assert precision_of(MixedPrecision("bf16-mixed", "cpu")) == "bf16"
    assert precision_of(Precision()) is None
    with pytest.raises(ValueError, match="peak_flops"):
        ModelThroughput(peak_flops=0)
    with pytest.raises(ValueError, match="bf16 or fp8"):
        ModelThroughput(precision="fp16")  # type: ignore[arg-type]


# -- activation checkpointing ---------------------------------------------------------------------
def _loss_grads_and_saved_bytes(model: Decoder, ids: torch.Tensor) -> tuple[torch.Tensor, dict, int]:
    saved = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal saved
        saved += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(ids, mtp=True)
        loss = F.cross_entropy(out.logits.flatten(0, 1), ids.flatten()) + out.aux_loss
        loss = loss + out.mtp_logits[0].float().square().mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, saved


@pytest.mark.parametrize("combo", list(COMBOS))
def test_checkpointing_gives_identical_losses_and_grads(combo: str) -> None:
    attention, router = COMBOS[combo]
    cfg = tiny(attention, router, mtp_depth=1)
    torch.manual_seed(0)
    reference = build_decoder(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 24))
    loss0, grads0, saved0 = _loss_grads_and_saved_bytes(reference, ids)
    saved = {}
    for mode in ("full", "selective"):
        model = build_decoder(cfg)
        model.load_state_dict(reference.state_dict())
        model.configure_runtime(mode)
        loss, grads, saved[mode] = _loss_grads_and_saved_bytes(model, ids)
        assert torch.equal(loss, loss0), mode
        for name, g in grads0.items():
            assert torch.equal(grads[name], g), (mode, name)
        # every routed token counted once although the forward ran again in backward
        for (_, a), (_, b) in zip(model.moe_layers(), reference.moe_layers()):
            assert torch.equal(a.tokens_per_expert, b.tokens_per_expert)
    # and the checkpointing is real: fewer activation bytes kept for backward
    assert saved["full"] < saved["selective"] < saved0


def test_checkpoint_layers_and_bad_runtime_config_fail_before_allocation() -> None:
    cfg = tiny(dict(name="mha"), dict(name="topk"))
    model = build_decoder(cfg)
    model.configure_runtime("full", checkpoint_layers=[2])
    assert [b.checkpointing for b in model.blocks()] == ["none", "none", "full"]
    with pytest.raises(ConfigError, match="checkpoint_layers"):
        PretrainModule(cfg, runtime=RuntimeConfig(activation_checkpointing="full", checkpoint_layers=[3]))
    with pytest.raises(ConfigError, match="activation_checkpointing"):
        PretrainModule(cfg, runtime=RuntimeConfig(activation_checkpointing="some"))  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="compile"):
        PretrainModule(cfg, runtime=RuntimeConfig(compile="model"))  # type: ignore[arg-type]


# -- torch.compile --------------------------------------------------------------------------------
@pytest.mark.parametrize("combo", list(COMBOS))
def test_blocks_compile_in_one_graph_with_identical_results(combo: str) -> None:
    attention, router = COMBOS[combo]
    cfg = tiny(attention, router, n_layers=2)
    torch.manual_seed(0)
    torch._dynamo.reset()
    reference = build_decoder(cfg)
    model = build_decoder(cfg)
    model.load_state_dict(reference.state_dict())
    model.configure_runtime("selective")
    for block in model.blocks():
        # fullgraph: any graph break in attention, router, dispatch or experts is an error.
        # aot_eager traces forward AND backward like inductor does, without its C++ compile time.
        block.compile(fullgraph=True, backend="aot_eager")
    ids = torch.randint(0, cfg.vocab_size, (2, 16))
    results = []
    for m in (model, reference):
        out = m(ids)
        loss = F.cross_entropy(out.logits.flatten(0, 1), ids.flatten()) + out.aux_loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in m.named_parameters()}))
    (loss1, grads1), (loss0, grads0) = results
    assert torch.allclose(loss1, loss0, atol=1e-6)
    for name, g in grads0.items():
        assert torch.allclose(grads1[name], g, atol=1e-6), name
    for (_, a), (_, b) in zip(model.moe_layers(), reference.moe_layers()):
        assert torch.equal(a.tokens_per_expert, b.tokens_per_expert)
    ctx = ForwardContext(torch.arange(16), ids, layer_id=1)
    explanation = torch._dynamo.explain(reference.layers[1])(torch.randn(2, 16, cfg.dim), ctx)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    torch._dynamo.reset()


# -- fast paths against their references ----------------------------------------------------------
def test_mla_flash_padding_matches_the_unpadded_reference() -> None:
    cfg = tiny(*COMBOS["mla+aux_free+grouped"])
    torch.manual_seed(0)
    model = build_decoder(cfg)
    attn = model.layers[0].attn
    x = torch.randn(2, 40, cfg.dim, requires_grad=True)
    docs = torch.tensor([[0] * 15 + [1] * 25, [0] * 40])
    for document_ids in (None, docs):
        outs = []
        for padded in (True, False):
            attn.pad_values_for_flash = padded
            y = attn(x, torch.arange(40), document_ids)
            (dx,) = torch.autograd.grad(y.square().sum(), x)
            outs.append((y, dx))
        assert torch.allclose(outs[0][0], outs[1][0], atol=1e-6)
        assert torch.allclose(outs[0][1], outs[1][1], atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_experts_match_a_naive_per_expert_loop(dtype: torch.dtype) -> None:
    """The sorted / index_select / grouped-GEMM / index_add path against the textbook loop."""
    from moeframe.model.experts import GroupedExperts, GroupedOptions

    E, K, D, F_, T = 6, 2, 32, 16, 40
    torch.manual_seed(0)
    experts = GroupedExperts(ModelConfig(), GroupedOptions(), E, D, F_)
    with torch.no_grad():
        for w in (experts.w1, experts.w2, experts.w3):
            w.normal_(0, 0.2)
    experts.to(dtype)
    x = torch.randn(T, D, dtype=dtype, requires_grad=True)
    scores = torch.randn(T, E)
    scores[:, 5] = -10  # one expert gets no token
    indices = scores.topk(K, dim=-1).indices
    gates = scores.gather(1, indices).softmax(-1).requires_grad_()
    y = experts(x, gates, indices)
    ref = torch.zeros(T, D)
    for t in range(T):
        for k in range(K):
            e = int(indices[t, k])
            h = F.silu(x[t].float() @ experts.w1[e].float().T) * (x[t].float() @ experts.w3[e].float().T)
            ref[t] += gates[t, k] * (h @ experts.w2[e].float().T)
    dy = torch.randn(T, D)
    grads = torch.autograd.grad(y.float(), (x, gates, experts.w1, experts.w2), dy)
    ref_grads = torch.autograd.grad(ref, (x, gates, experts.w1, experts.w2), dy)
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # bf16: a few roundings of 2^-8 each

    def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
        return ((a.float() - b.float()).norm() / b.float().norm()).item()

    assert rel_err(y, ref) < tol
    for g, r in zip(grads, ref_grads):
        assert rel_err(g, r) < tol


def test_scatter_counts_and_grouped_mm_op_match_their_references() -> None:
    g = torch.Generator().manual_seed(0)
    indices = torch.randint(0, 7, (50, 3), generator=g)
    assert torch.equal(count_per_expert(indices, 9), torch.bincount(indices.flatten(), minlength=9))
    E, N, I, O = 5, 40, 16, 8
    offs = torch.tensor([6, 6, 20, 33, 40], dtype=torch.int32)  # expert 1 gets no rows
    x = torch.randn(N, I, generator=g, requires_grad=True)
    w = torch.randn(E, I, O, generator=g, requires_grad=True)
    dy = torch.randn(N, O, generator=g)
    y_op = grouped_mm_op(x, w, offs)
    dx_op, dw_op = torch.autograd.grad(y_op, (x, w), dy)
    starts = [0, *offs.tolist()[:-1]]
    y_ref = torch.cat([x[s:e] @ w[i] for i, (s, e) in enumerate(zip(starts, offs.tolist()))])
    dx_ref, dw_ref = torch.autograd.grad(y_ref, (x, w), dy)
    assert torch.allclose(y_op, y_ref, atol=1e-5)
    assert torch.allclose(dx_op, dx_ref, atol=1e-5) and torch.allclose(dw_op, dw_ref, atol=1e-5)
    assert torch.equal(dw_op[1], torch.zeros(I, O))


# -- benchmarks in smoke mode ---------------------------------------------------------------------
@pytest.mark.parametrize("script", ["compare_hf.py", "moe_layer.py", "gpu_step.py", "compile_levers.py"])
def test_benchmark_runs_in_smoke_mode(script: str, tmp_path: Path) -> None:
    args = [sys.executable, str(REPO / "benchmarks" / script), "--smoke"]
    if script == "gpu_step.py":
        args += ["--results", str(tmp_path / "RESULTS.md")]
    if script == "compile_levers.py":  # the uncompiled variants: compiling would take a minute here
        args += ["--variants", "eager", "eager+loop"]
    run = subprocess.run(
        args, capture_output=True, text=True, timeout=300, cwd=tmp_path, env=clean_env(TRANSFORMERS_VERBOSITY="error")
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    if script == "compare_hf.py":
        assert "moeframe / transformers tokens/s" in run.stdout and "logits" in run.stdout
    elif script == "moe_layer.py":
        assert "naive / moeframe" in run.stdout
    elif script == "compile_levers.py":
        assert "eager+loop" in run.stdout and "x of eager" in run.stdout
    else:
        assert "bf16" in run.stdout and (tmp_path / "RESULTS.md").read_text().count("| smoke") >= 1
