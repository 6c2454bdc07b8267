"""moeframe versus HF transformers' DeepseekV3ForCausalLM, side by side, same weights.

One V3-shaped configuration (MLA with q compression and decoupled RoPE, a dense first layer,
fine-grained routed experts with group-limited sigmoid routing and one shared expert) is built
by transformers with a fixed seed, saved with ``save_pretrained`` and loaded into moeframe
through ``moeframe.convert.from_hf``: both models hold exactly the same weights. transformers
runs with SDPA attention and its fastest experts implementation available on this machine
(``grouped_mm``: one grouped GEMM per projection over the sorted tokens); moeframe runs its
default plugins (``mla``, ``aux_free``, ``grouped``).

Both train on the same batch in the same dtype (the whole model cast, as Lightning's
``*-true`` precisions do; routers keep fp32 weights in both, as transformers loads them), with
the same loss (fp32 cross-entropy over the logits) and the same optimizer: AdamW with the
implementation transformers' Trainer picks by default on torch >= 2.8 (``fused=True``). A
training step is forward + backward + ``optimizer.step()`` + ``zero_grad``. The two models
alternate step by step in one process, so drift in machine load hits both alike; the median
step time of each gives tokens/s.

Work differences, stated: moeframe also computes the aux_free router's sequence-wise balance
loss (alpha = 1e-4, part of V3 training) and counts tokens per expert; transformers computes
neither. Both are included in moeframe's time.

Memory: peak resident set size is per process and never goes down, so it cannot separate two
models in one process. Instead each model's training step runs once under
``torch.profiler`` with ``profile_memory=True`` and the peak of the profiler's running total of
live tensor bytes (allocations minus frees by the CPU allocator, in time order) is reported: the activations, gradients
and optimizer state a step adds on top of the weights. The weights' own bytes are printed beside.

Denormals: both run with ``torch.set_flush_denormal(True)``. Without it, transformers' float32
step slows down 5-20x over a few steps on this CPU (its elementwise ops meet denormal floats),
which would flatter moeframe; flushing them is the usual setting for CPU training.

``--compile`` adds a third contestant: moeframe with ``compile: block`` (inductor), timed after
its compilation (printed separately).

Logits check: in float32 the two models' logits must agree to 1e-4 (printed, and a mismatch
exits 1). In bfloat16 both are compared to the float32 reference: moeframe's error must not
exceed 1.5x transformers' own bf16 error (rounding differs in the order of operations, not in
the maths).

Where the difference comes from (profiled): the routed experts are one grouped GEMM per
projection in both (about half of the step) and run at the same speed; moeframe's MLA pads values
to the query/key head width so SDPA takes its flash kernel, while transformers' SDPA path falls
back to the math kernel for MLA's unequal head widths and materialises every [T, T] score matrix,
so the gap widens with the sequence length; moeframe's token gather uses ``index_select``, whose
backward is an index_add rather than advanced indexing's sort-based accumulate. In bfloat16 the
largest difference: torch's CPU bf16 matmul (oneDNN) builds a kernel for every new matrix shape
(~0.6 ms each, ~1k kept), and the per-expert row counts change at every step, so transformers'
expert GEMMs keep meeting new shapes and run ~3x slower than on shapes seen before; moeframe pads
each expert's rows to a multiple of 32 (zero rows, same results; ``GroupedExperts``'
``cpu_bf16_group_multiple``) and meets a few shapes only.

    python benchmarks/compare_hf.py [--dtypes float32 bfloat16] [--steps 8] [--batch 1 --seq 1024]
    python benchmarks/compare_hf.py --smoke        # tiny sizes, seconds; what the tests run
    python benchmarks/compare_hf.py --threads 1 --clock cpu   # CPU time per step: for a shared machine
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import transformers

from moeframe.convert import from_hf
from moeframe.model.base import RouterBase

# A DeepSeek-V3-shaped model at CPU scale: V3's proportions (dim 7168, q_lora 1536, kv_lora 512,
# 256 experts of width 2048 in 8 groups, 4 groups kept, top-8, 1 shared, dense first layers)
# shrunk so that one training step takes about a second on 2 cores.
V3_SHAPED = dict(
    vocab_size=4096,
    hidden_size=256,
    intermediate_size=640,
    moe_intermediate_size=64,
    num_hidden_layers=4,
    first_k_dense_replace=1,
    num_attention_heads=8,
    num_key_value_heads=8,
    q_lora_rank=64,
    kv_lora_rank=64,
    qk_nope_head_dim=32,
    qk_rope_head_dim=16,
    v_head_dim=32,
    n_routed_experts=64,
    num_experts_per_tok=6,
    n_group=8,
    topk_group=4,
    n_shared_experts=1,
    routed_scaling_factor=2.5,
    norm_topk_prob=True,
    max_position_embeddings=1024,
    num_nextn_predict_layers=0,
    rope_interleave=True,
)
SMOKE = dict(
    V3_SHAPED,
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    moe_intermediate_size=16,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    q_lora_rank=32,
    kv_lora_rank=16,
    qk_nope_head_dim=8,
    qk_rope_head_dim=8,
    v_head_dim=8,
    n_routed_experts=8,
    num_experts_per_tok=2,
    n_group=4,
    topk_group=2,
)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def make_checkpoint(folder: Path, shape: dict[str, Any], seed: int = 0) -> None:
    """A random transformers DeepseekV3 checkpoint (fp32) with a non-zero router bias, as trained."""
    torch.manual_seed(seed)
    model = transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(**shape))
    with torch.no_grad():
        for _name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.02)  # transformers' init leaves the stacked experts unset on CPU
        for m in model.modules():
            if hasattr(m, "e_score_correction_bias"):
                m.e_score_correction_bias.normal_(0, 0.02)
    model.save_pretrained(folder)


def load_hf(folder: Path, dtype: torch.dtype) -> torch.nn.Module:
    model = transformers.DeepseekV3ForCausalLM.from_pretrained(
        folder, dtype=dtype, attn_implementation="sdpa", experts_implementation="grouped_mm"
    )
    return model.train()


def load_moeframe(folder: Path, dtype: torch.dtype) -> torch.nn.Module:
    decoder = from_hf(folder, dtype=torch.float32, progress=False)
    routers = {n: m.weight.detach().clone() for n, m in decoder.named_modules() if isinstance(m, RouterBase)}
    decoder.to(dtype)
    with torch.no_grad():  # routers stay fp32, as transformers keeps mlp.gate.weight
        for name, weight in routers.items():
            decoder.get_submodule(name).weight.data = weight
    return decoder.train()


def hf_logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, use_cache=False).logits


def moeframe_logits_and_aux(model: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    out = model(ids)
    return out.logits, out.aux_loss


@dataclass
class Trainee:
    name: str
    model: torch.nn.Module
    step: Callable[[], float]
    times: list[float]


# the step's clock: wall time, or the CPU time of this process (user + system over all its threads),
# which a shared machine's other jobs do not inflate; with --threads 1 it is the step's compute time
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}
CLOCK = CLOCKS["wall"]


def trainee(name: str, model: torch.nn.Module, ids: torch.Tensor, labels: torch.Tensor) -> Trainee:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    is_hf = isinstance(model, transformers.PreTrainedModel)

    def step() -> float:
        start = CLOCK()
        if is_hf:
            logits, aux = hf_logits(model, ids), 0.0
        else:
            logits, aux = moeframe_logits_and_aux(model, ids)
        loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten()) + aux
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return CLOCK() - start

    return Trainee(name, model, step, [])


def profiled_peak_bytes(step: Callable[[], float]) -> int:
    """Peak of live CPU tensor bytes during one step, from the profiler's allocation events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    # self_* counts each allocation/free once, in the op that made it (cpu_memory_usage would count
    # a child's allocations again in every enclosing op)
    events = sorted((e for e in prof.events() if e.self_cpu_memory_usage != 0), key=lambda e: e.time_range.start)
    live = peak = 0
    for e in events:
        live += e.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


def check_logits(folder: Path, dtype: torch.dtype, ids: torch.Tensor) -> tuple[bool, str]:
    with torch.no_grad():
        ref = hf_logits(load_hf(folder, torch.float32).eval(), ids).float()
        ours = load_moeframe(folder, dtype).eval()(ids).logits.float()
        if dtype == torch.float32:
            diff = (ours - ref).abs().max().item()
            return diff <= 1e-4, f"max |moeframe - transformers| logits = {diff:.2e} (bound 1e-4)"
        theirs = hf_logits(load_hf(folder, dtype).eval(), ids).float()
    ours_err, theirs_err = (ours - ref).abs().mean().item(), (theirs - ref).abs().mean().item()
    ok = ours_err <= 1.5 * theirs_err + 1e-6
    return ok, (
        f"mean |logits - fp32 reference|: moeframe {ours_err:.2e}, transformers {theirs_err:.2e} "
        f"(moeframe within 1.5x of transformers' own {dtype} error)"
    )


def weight_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def run(
    dtype_name: str, folder: Path, batch: int, seq: int, steps: int, warmup: int, vocab: int, compiled: bool = False
) -> dict[str, Any]:
    dtype = DTYPES[dtype_name]
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (batch, seq), generator=gen)
    labels = torch.randint(0, vocab, (batch, seq), generator=gen)
    ok, logits_msg = check_logits(folder, dtype, ids)
    contestants = [
        trainee("transformers", load_hf(folder, dtype), ids, labels),
        trainee("moeframe", load_moeframe(folder, dtype), ids, labels),
    ]
    if compiled:
        model = load_moeframe(folder, dtype)
        model.configure_runtime(compile="block")
        contestants.append(trainee("moeframe+compile", model, ids, labels))
        start = time.perf_counter()
        contestants[-1].step()  # compiles forward and backward
        print(f"  ({dtype_name}: moeframe compile: block compiled in {time.perf_counter() - start:.0f} s)")
    for _ in range(warmup):
        for c in contestants:
            c.step()
    for _ in range(steps):  # alternate: both see the same machine state
        for c in contestants:
            c.times.append(c.step())
    result: dict[str, Any] = {"dtype": dtype_name, "logits_ok": ok, "logits": logits_msg}
    for c in contestants:
        median = statistics.median(c.times)
        result[c.name] = {
            "step_s": median,
            "tokens_per_s": batch * seq / median,
            "peak_bytes": profiled_peak_bytes(c.step),
            "weight_bytes": weight_bytes(c.model),
        }
    result["names"] = [c.name for c in contestants]
    result["ratio"] = result["moeframe"]["tokens_per_s"] / result["transformers"]["tokens_per_s"]
    if compiled:
        result["ratio_compiled"] = result["moeframe+compile"]["tokens_per_s"] / result["transformers"]["tokens_per_s"]
    return result


def print_result(r: dict[str, Any]) -> None:
    print(f"\n{r['dtype']}: {r['logits']}")
    print(f"{'':18s}{'step ms':>10s}{'tokens/s':>12s}{'peak step MiB':>15s}{'weights MiB':>13s}")
    for name in r["names"]:
        s = r[name]
        print(
            f"{name:18s}{s['step_s'] * 1e3:10.1f}{s['tokens_per_s']:12,.0f}{s['peak_bytes'] / 2**20:15.1f}"
            f"{s['weight_bytes'] / 2**20:13.1f}"
        )
    print(f"moeframe / transformers tokens/s = {r['ratio']:.2f}x")
    if "ratio_compiled" in r:
        print(f"moeframe (compile: block) / transformers tokens/s = {r['ratio_compiled']:.2f}x")
        print(f"moeframe compile: block / eager tokens/s = {r['ratio_compiled'] / r['ratio']:.2f}x")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=list(DTYPES))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=1024, help="V3 trains at 4096; attention's share grows with it")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--smoke", action="store_true", help="tiny model, 2 steps: checks the script runs")
    parser.add_argument("--compile", action="store_true", help="also time moeframe with compile: block (inductor)")
    parser.add_argument(
        "--clock", choices=list(CLOCKS), default="wall", help="cpu: the process's CPU time per step (shared machines)"
    )
    args = parser.parse_args(argv)
    global CLOCK
    CLOCK = CLOCKS[args.clock]
    torch.set_flush_denormal(True)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)
    shape = SMOKE if args.smoke else V3_SHAPED
    batch, seq = (2, 32) if args.smoke else (args.batch, args.seq)
    steps, warmup = (2, 1) if args.smoke else (args.steps, args.warmup)
    print(
        f"V3-shaped model: {shape}\nbatch {batch} x {seq} tokens, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}, transformers {transformers.__version__} (sdpa, grouped_mm experts), "
        f"AdamW fused, median of {steps} alternating steps after {warmup} warm-up, {args.clock} clock"
    )
    all_ok = True
    with tempfile.TemporaryDirectory() as tmp:
        make_checkpoint(Path(tmp), shape)
        for dtype_name in args.dtypes:
            r = run(dtype_name, Path(tmp), batch, seq, steps, warmup, shape["vocab_size"], args.compile)
            print_result(r)
            all_ok &= r["logits_ok"]
    return 0 if all_ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
