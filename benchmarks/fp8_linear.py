"""FP8 Linear and a full training step versus BF16, on DeepSeek-V3-shaped layers.

Two measurements per shape, each the median of ``--iters`` timed repetitions after warm-up:

1. *Linear*: one Linear's forward + backward (all three GEMMs plus the quantisation), ``fp8_linear``
   versus ``F.linear`` in BF16 (weights kept fp32, autocast, as in bf16-mixed training).
2. *Training step*: a V3 dense FFN block (SwiGLU, ``w1``/``w3`` K->N, ``w2`` N->K) forward, backward
   and AdamW step, converted by the plugin's own ``convert_to_fp8`` versus the same block under
   bf16 autocast.

On a CUDA GPU of capability 9.0 (H100/H200) the FP8 side uses the ``hopper`` backend (cuBLAS
block-scaled FP8 through ``torch.nn.functional.scaled_mm``); before timing, the script checks the
hopper GEMMs against the ``emulated`` ones on the same quantised operands and prints the largest
relative difference (they compute the same sums in a different order: ~1e-6 expected).
Target (issue 6): FP8 step >= 1.3x faster than BF16 on a V3-shaped layer.

    python benchmarks/fp8_linear.py                 # GPU: 8192 tokens, 7168->2048 and 7168->18432
    python benchmarks/fp8_linear.py --smoke         # CPU: small shapes, emulated backend, seconds

On the CPU only ``emulated`` runs: it reproduces the numerics, it is not a fast path, so the CPU
ratio says how much slower emulation is, nothing about FP8 hardware.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from moeframe_fp8 import FP8Recipe, convert_to_fp8, fp8_linear, quantize_tiles, quantize_weight
from moeframe_fp8.gemm import gemm_emulated, gemm_hopper
from moeframe_fp8.precision import resolve_backend

V3_SHAPES = [(7168, 2048), (7168, 18432)]  # (in, out): a routed expert's w1/w3, the dense FFN's w1/w3
SMOKE_SHAPES = [(384, 256)]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], None], device: torch.device, warmup: int, iters: int) -> float:
    """Median seconds of one call."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def check_hopper(device: torch.device, tokens: int, k: int, n: int) -> float:
    """Largest relative difference between the hopper and emulated GEMMs (fwd, dgrad, wgrad forms)."""
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(tokens, k, device=device, generator=g)
    w = torch.randn(n, k, device=device, generator=g) * 0.02
    dy = torch.randn(tokens, n, device=device, generator=g)
    xq, xs = quantize_tiles(x)
    wq, ws = quantize_weight(w)
    dyq, dys = quantize_tiles(dy)
    cases = [
        (xq, xs, wq, ws, True),
        (dyq, dys, wq.t(), ws.t(), True),
        (*quantize_tiles(dy.t()), *quantize_tiles(x.t()), False),
    ]
    worst = 0.0
    for a, a_s, b, b_s, blocks in cases:
        ref = gemm_emulated(a, a_s, b, b_s, blocks)
        got = gemm_hopper(a, a_s, b, b_s, blocks, torch.float32)
        worst = max(worst, float((got - ref).abs().max() / ref.abs().max()))
    return worst


def bench_linear(
    device: torch.device, backend: str, tokens: int, k: int, n: int, warmup: int, iters: int
) -> tuple[float, float]:
    x = torch.randn(tokens, k, device=device, requires_grad=True)
    w = (torch.randn(n, k, device=device) * 0.02).requires_grad_()
    recipe = FP8Recipe(backend=backend)  # type: ignore[arg-type]

    def bf16() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            y = F.linear(x, w)
        y.backward(torch.ones_like(y))

    def fp8() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            y = fp8_linear(x, w, None, recipe)
        y.backward(torch.ones_like(y))

    return timed(bf16, device, warmup, iters), timed(fp8, device, warmup, iters)


def bench_step(
    device: torch.device, backend: str, tokens: int, k: int, n: int, warmup: int, iters: int
) -> tuple[float, float]:
    results = []
    for use_fp8 in (False, True):
        torch.manual_seed(0)
        block = SwiGLU(k, n).to(device)
        if use_fp8:
            convert_to_fp8(block, FP8Recipe(backend=backend))  # type: ignore[arg-type]
        optimizer = torch.optim.AdamW(block.parameters(), lr=1e-4)
        x = torch.randn(tokens, k, device=device)

        def step() -> None:
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = block(x).float().square().mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        results.append(timed(step, device, warmup, iters))
        del block, optimizer
    return results[0], results[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="small shapes on the CPU (emulated), a few seconds")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--backend", default="auto", choices=["auto", "emulated", "hopper"])
    parser.add_argument("--tokens", type=int, default=None, help="rows of the activations (default 8192; smoke 256)")
    parser.add_argument("--iters", type=int, default=None)
    args = parser.parse_args()

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.smoke else "cpu"))
    try:
        backend = resolve_backend(args.backend, device)
    except ValueError as exc:
        parser.error(str(exc))
    shapes = SMOKE_SHAPES if args.smoke else V3_SHAPES
    tokens = args.tokens or (256 if args.smoke else 8192)
    iters = args.iters or (2 if args.smoke else 20)
    warmup = 1 if args.smoke else 5
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(
        f"device: {name}; torch {torch.__version__}; fp8 backend: {backend}; {tokens} tokens; "
        f"median of {iters} after {warmup} warm-up"
    )
    if backend == "hopper":
        print(
            f"hopper vs emulated GEMMs (fwd, dgrad, wgrad), max relative difference: "
            f"{check_hopper(device, min(tokens, 1024), *shapes[0]):.2e}"
        )
    print("| layer (in->out) | what | BF16 ms | FP8 ms | BF16/FP8 |")
    print("|---|---|---:|---:|---:|")
    for k, n in shapes:
        lin_bf16, lin_fp8 = bench_linear(device, backend, tokens, k, n, warmup, iters)
        print(f"| {k}->{n} | Linear fwd+bwd | {1e3 * lin_bf16:.2f} | {1e3 * lin_fp8:.2f} | {lin_bf16 / lin_fp8:.2f}x |")
        step_bf16, step_fp8 = bench_step(device, backend, tokens, k, n, warmup, iters)
        print(
            f"| {k}->{n}->{k} SwiGLU | train step (fwd+bwd+AdamW) | {1e3 * step_bf16:.2f} | {1e3 * step_fp8:.2f} | "
            f"{step_bf16 / step_fp8:.2f}x |"
        )
    if backend == "emulated":
        print(
            "(emulated backend: the FP8 numerics in fp32 arithmetic, slower than BF16 by design; "
            "the speed figure needs an H100/H200)"
        )


if __name__ == "__main__":
    main()
