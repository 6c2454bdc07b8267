"""Levers for ``compile: block`` on the CPU, side by side in one process (issue 23).

The V3-shaped model of ``compare_hf.py`` (same checkpoint, same batch, same fused AdamW and fp32
cross-entropy) trained by several moeframe variants that alternate step by step, so that machine
load hits all alike; with ``--clock cpu --threads 1`` a step's time is its compute. Each variant
names one lever:

- ``eager``: no compile (the reference).
- ``block``: ``compile: block`` as shipped (inductor, default options).
- ``autotune``: ``block`` with inductor's GEMM autotuning (``max_autotune`` with the C++ GEMM
  template beside ATen). Measured: in training it changes nothing, because inductor offers the
  template only for weights that are graph constants (frozen inference graphs).
- ``loss``: ``block`` plus the loss (fp32 upcast + cross-entropy over the logits) compiled.

A ``+loop`` suffix (``eager+loop``, ``block+loop``) steps the model with AdamW's default per-tensor
loop instead of the fused kernel: ``moeframe fit``'s optimizer unless ``optim.fused: true``
(``compare_hf`` uses the fused kernel for both frameworks, as transformers' Trainer does).

    python benchmarks/compile_levers.py --threads 1 --clock cpu --batch 4 --seq 256 --variants eager block loss
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_hf import DTYPES, SMOKE, V3_SHAPED, load_moeframe, make_checkpoint  # noqa: E402

CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}
AUTOTUNE = {"max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN"}
LEVERS = ("eager", "block", "autotune", "loss")


def variant_name(text: str) -> str:
    """A lever, optionally with ``+loop`` (argparse type: an unknown name is a usage error)."""
    if text.removesuffix("+loop") not in LEVERS:
        raise argparse.ArgumentTypeError(f"{text!r}: use one of {', '.join(LEVERS)}, optionally with +loop")
    return text


def ce(logits_BTV: torch.Tensor, labels_BT: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits_BTV.float().flatten(0, 1), labels_BT.flatten())


def build(variant: str, folder: Path, dtype: torch.dtype) -> tuple[torch.nn.Module, Callable]:
    """The model and its forward-to-loss function for one variant."""
    variant = variant.removesuffix("+loop")
    model = load_moeframe(folder, dtype)
    loss_fn: Callable = ce
    if variant == "eager":
        pass
    elif variant == "autotune":
        for block in model.blocks():
            block.compile(options=AUTOTUNE)
    else:
        model.configure_runtime(compile="block")
    if variant == "loss":
        loss_fn = torch.compile(ce)

    def forward_loss(ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        out = model(ids)
        return loss_fn(out.logits, labels) + out.aux_loss

    return model, forward_loss


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variants", nargs="+", type=variant_name, default=["eager", "block"])
    p.add_argument("--dtype", default="float32", choices=list(DTYPES))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--clock", choices=list(CLOCKS), default="cpu")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--profile", default="", help="variant to profile (1 step): prints the top ops")
    args = p.parse_args(argv)
    clock = CLOCKS[args.clock]
    torch.set_flush_denormal(True)
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    shape = SMOKE if args.smoke else V3_SHAPED
    if args.smoke:  # tiny sizes, one step: checks the script runs (the tests use uncompiled variants)
        args.batch, args.seq, args.steps, args.warmup = 2, 32, 1, 0
    dtype = DTYPES[args.dtype]
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, shape["vocab_size"], (args.batch, args.seq), generator=gen)
    labels = torch.randint(0, shape["vocab_size"], (args.batch, args.seq), generator=gen)
    with tempfile.TemporaryDirectory() as tmp:
        make_checkpoint(Path(tmp), shape)
        runs = {}
        for v in args.variants:
            model, fl = build(v, Path(tmp), dtype)
            fused = None if v.endswith("+loop") else True
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=fused)
            runs[v] = (model, fl, opt, [], [])

    def step(v: str) -> float:
        model, fl, opt, times, losses = runs[v]
        start = clock()
        loss = fl(ids, labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        elapsed = clock() - start
        losses.append(loss.item())
        return elapsed

    for v in args.variants:
        start = time.perf_counter()
        step(v)
        print(f"{v}: first step (compile) {time.perf_counter() - start:.1f} s wall", flush=True)
    for _ in range(args.warmup):
        for v in args.variants:
            step(v)
    for _ in range(args.steps):
        for v in args.variants:
            runs[v][3].append(step(v))
    base = statistics.median(runs[args.variants[0]][3])
    base_min = min(runs[args.variants[0]][3])
    print(
        f"\n{args.dtype} {args.batch}x{args.seq}, {args.threads} thread(s), {args.clock} clock, median of {args.steps}"
    )
    for v in args.variants:
        med = statistics.median(runs[v][3])
        losses = runs[v][4]
        ref = runs[args.variants[0]][4]
        dl = max(abs(a - b) for a, b in zip(losses, ref, strict=True))
        best = min(runs[v][3])  # interference only adds time: the fastest step is the steadier figure
        print(
            f"{v:10s} median {med * 1e3:7.1f} ms {base / med:5.2f}x of {args.variants[0]}, "
            f"min {best * 1e3:7.1f} ms {base_min / best:5.2f}x  max |loss - ref| {dl:.2e}"
        )
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step(args.profile)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
