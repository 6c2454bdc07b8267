"""Training-step throughput and MFU of a V3-shaped model on one GPU, through the real Trainer.

The model keeps DeepSeek-V3's structure at ~2.5B total parameters so that it trains on one H200:
MLA with V3's head dims (q_lora, kv_lora, nope 128 / rope 64 / v 128), fine-grained routed
experts (64 of width dim/4, top-6, in 8 groups with 4 kept, one shared expert), the aux_free
router, a dense first layer. ``PretrainModule`` trains it under ``lightning.Trainer`` on random
tokens (the data path is measured elsewhere: benchmarks/data_throughput.py), with the
``ModelThroughput`` callback reporting tokens/s, model FLOP/s (the same count as ``moeframe
inspect``) and MFU against the built-in dense peak of the device at that precision.

Precisions: ``bf16`` (Lightning ``bf16-true``: bf16 weights and optimizer state) and ``fp8`` (the
``fp8`` precision plugin from the registry, i.e. plugins/moeframe-fp8; skipped with a message when
it is not installed). ``--compile`` adds ``runtime.compile: block``. One configuration per process
(benchmarks/gpu.sh runs them one after another with timeouts). A row per run is appended to
``--results`` (benchmarks/RESULTS.md by default) under "GPU training step".

    python benchmarks/gpu_step.py --precision bf16 [--compile] [--steps 20 --warmup 5]
    python benchmarks/gpu_step.py --smoke --results /tmp/RESULTS.md   # tiny, CPU: what the tests run
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from moeframe.config import ModelConfig, RuntimeConfig
from moeframe.inspect import inspect_model
from moeframe.training.pretrain import PretrainModule
from moeframe.training.throughput import ModelThroughput

REPO = Path(__file__).resolve().parents[1]
SECTION = "## GPU training step: `benchmarks/gpu.sh`"
HEADER = (
    "| date (UTC) | machine | precision | compile | model (total / activated params) | batch x seq | "
    "tokens/s | step ms | model TFLOP/s per GPU | MFU | command |\n|---|---|---|---|---|---|---:|---:|---:|---:|---|"
)

V3_ON_ONE_GPU = dict(
    vocab_size=32768,
    dim=2048,
    n_layers=12,
    first_k_dense=1,
    n_heads=16,
    dense_ffn_dim=5632,
    moe_ffn_dim=512,
    n_routed_experts=64,
    n_activated_experts=6,
    n_shared_experts=1,
    n_expert_groups=8,
    n_limited_groups=4,
    route_scale=2.5,
    max_seq_len=4096,
    init_std=0.006,
    attention=dict(
        name="mla", q_lora_rank=768, kv_lora_rank=256, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128
    ),
    router=dict(name="aux_free", bias_update_speed=0.001, seq_aux_loss_coef=0.0001),
)
SMOKE = dict(
    V3_ON_ONE_GPU,
    vocab_size=256,
    dim=64,
    n_layers=2,
    n_heads=4,
    dense_ffn_dim=128,
    moe_ffn_dim=16,
    n_routed_experts=8,
    n_activated_experts=2,
    n_expert_groups=4,
    n_limited_groups=2,
    max_seq_len=64,
    attention=dict(name="mla", q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16),
)


class RandomTokens(Dataset):
    """Uniform random token ids: the step's cost does not depend on the values."""

    def __init__(self, vocab: int, seq: int, n: int) -> None:
        self.vocab, self.seq, self.n = vocab, seq, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(i)
        ids = torch.randint(0, self.vocab, (self.seq + 1,), generator=g)
        return {"input_ids": ids[:-1], "labels": ids[1:]}


def fp8_plugin(experts: bool = True) -> Any | None:
    """The registry's ``fp8`` precision plugin, or None when it is not installed. ``experts=False``
    keeps the routed experts in BF16 (the plugin runs them as one FP8 GEMM per expert, which the
    run with them measures against this one)."""
    from moeframe import registry

    if "fp8" not in registry.available("precision"):
        return None
    return registry.load("precision", "fp8")(exclude=None if experts else ["*.experts"])


def machine() -> str:
    if torch.cuda.is_available():
        return f"1x {torch.cuda.get_device_name(0)}"
    return f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"


def append_row(results: Path, row: str) -> None:
    text = results.read_text() if results.exists() else ""
    if SECTION not in text:
        text = (
            text.rstrip("\n")
            + f"\n\n{SECTION}\n\nRows appended by `benchmarks/gpu_step.py` (one per run).\n\n{HEADER}\n"
        )
    results.write_text(text.rstrip("\n") + "\n" + row + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--precision", choices=["bf16", "fp8"], default="bf16")
    p.add_argument("--compile", action="store_true", help="runtime.compile: block")
    p.add_argument(
        "--fp8-experts",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="with --precision fp8: routed experts in FP8 too (default) or kept in BF16",
    )
    p.add_argument("--checkpointing", choices=["none", "full", "selective"], default="none")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--steps", type=int, default=20, help="measured optimizer steps (after --warmup)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--peak-flops", type=float, default=None, help="peak FLOP/s of one device (default: built in)")
    p.add_argument("--results", type=Path, default=REPO / "benchmarks" / "RESULTS.md")
    p.add_argument("--smoke", action="store_true", help="tiny model on the CPU, 2+1 steps, bf16 and fp8")
    args = p.parse_args(argv)
    precisions = ["bf16", "fp8"] if args.smoke else [args.precision]
    if args.smoke:
        args.batch, args.seq, args.steps, args.warmup = 2, 32, 2, 1
        args.peak_flops = args.peak_flops or 1e12  # a CPU has no built-in peak; a nominal one exercises MFU
    if not args.smoke and not torch.cuda.is_available():
        print("no CUDA device: run with --smoke on a CPU", file=sys.stderr)
        return 2
    for precision in precisions:
        try:
            run_one(args, precision)
        except torch.cuda.OutOfMemoryError:
            # one retry at half the batch rather than losing the measurement
            print(f"{precision}: out of memory at batch {args.batch}; retrying at batch {args.batch // 2}")
            torch.cuda.empty_cache()
            args.batch //= 2
            run_one(args, precision)
    return 0


def _params(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"


def run_one(args: argparse.Namespace, precision: str) -> None:
    shape = SMOKE if args.smoke else V3_ON_ONE_GPU
    cfg = ModelConfig(**shape)
    plugins, trainer_precision = [], "bf16-true"
    if precision == "fp8":
        plugin = fp8_plugin(experts=args.fp8_experts)
        if plugin is None:
            print("fp8: SKIPPED: precision plugin 'fp8' is not installed (pip install -e plugins/moeframe-fp8)")
            return
        plugins, trainer_precision = [plugin], None
    report = inspect_model(cfg, "v3-on-one-gpu", seq_len=args.seq)
    runtime = RuntimeConfig(compile="block" if args.compile else "off", activation_checkpointing=args.checkpointing)
    module = PretrainModule(cfg, runtime=runtime)
    throughput = ModelThroughput(peak_flops=args.peak_flops, window=args.steps)
    total_steps = args.warmup + args.steps
    loader = DataLoader(
        RandomTokens(cfg.vocab_size, args.seq, args.batch * total_steps),
        batch_size=args.batch,
        num_workers=2 if torch.cuda.is_available() else 0,
        pin_memory=torch.cuda.is_available(),
    )
    trainer_kwargs: dict[str, Any] = dict(
        max_steps=total_steps,
        accelerator="gpu" if torch.cuda.is_available() else "cpu",
        devices=1,
        plugins=plugins,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        gradient_clip_val=1.0,
        callbacks=[throughput],
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    if trainer_precision is not None:
        trainer_kwargs["precision"] = trainer_precision
    start = time.perf_counter()
    L.Trainer(**trainer_kwargs).fit(module, train_dataloaders=loader)
    wall = time.perf_counter() - start
    m = throughput.metrics(world_size=1)
    mfu = m.get("perf/mfu")
    tflops = m["perf/model_flops_per_sec_per_device"] / 1e12
    mfu_text = f"{mfu:.1%}" if mfu is not None else "n/a (no peak)"
    print(
        f"{precision}{' +compile' if args.compile else ''}: {m['perf/tokens_per_sec']:,.0f} tokens/s, "
        f"step {m['perf/step_time_s'] * 1e3:.1f} ms, {tflops:.3g} model TFLOP/s, MFU {mfu_text} "
        f"(last {args.steps} of {total_steps} steps; {wall:.0f} s wall; peak memory "
        f"{torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0:.1f} GiB)"
    )
    command = "python benchmarks/gpu_step.py " + " ".join(sys.argv[1:])
    row = (
        f"| {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} | {machine()} | "
        f"{precision}{'' if precision != 'fp8' or args.fp8_experts else ' (experts bf16)'}"
        f"{' (smoke)' if args.smoke else ''} | {'block' if args.compile else 'off'} | "
        f"{_params(report.total)} / {_params(report.activated)} | {args.batch} x {args.seq} | "
        f"{m['perf/tokens_per_sec']:,.0f} | {m['perf/step_time_s'] * 1e3:.1f} | {tflops:.3g} | {mfu_text} | "
        f"`{command}` |"
    )
    if args.smoke:
        row = row.replace("| ", "| smoke ", 1)
    append_row(args.results, row)


if __name__ == "__main__":
    raise SystemExit(main())
