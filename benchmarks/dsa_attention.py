"""One DeepSeek Sparse Attention layer against dense MLA over the context length, on the CPU.

The same MLA weights run twice: as attention ``mla`` (dense) and as attention ``dsa`` (the same
MLA plus a lightning indexer, top-k selection). For each context length S:

- training step: forward + backward over S tokens (``dsa`` in its sparse mode, indexer KL
  included, as a stage-2 training step computes it);
- decode: one new token against a cache of S tokens (MLA's absorbed latent cache; DSA's also
  holds the index keys), the cache filled with random rows (only its size matters here).

Both are reported: matmul FLOPs counted by torch's FlopCounterMode on the meta device (exact for
this implementation, independent of the machine's load; SDPA's causal kernel counted for its
causal half) and wall time (the fastest of a few runs; on a busy shared machine only a rough guide).

What to expect: dense attention grows with S per query (S²/2 per sequence in training), DSA's main
attention with k per query; the indexer still scores all S tokens, but with few heads and one
shared key. Below S = k, DSA selects every token and runs dense MLA plus the indexer: slower. The
crossover is the first S at which DSA is faster. This is a plain-PyTorch reference (gathered
rows, chunked and recomputed in backward), not the release's fused FP8 kernels: the crossover on
a GPU with those kernels comes much earlier.

The default shape is V3's attention narrowed to fit a shared 2-core CPU: dim 1024, 8 heads of
MLA (q_lora 256, kv_lora 256, nope/rope/v 64/32/64), an indexer of 4 heads × 64 (the release's
ratio of indexer to MLA heads, 64:128), k = 2048 (the release's).

Which tokens each query selects decides the training cost (``moeframe_dsa.selected``): with random
weights the indexer's selections barely overlap between neighbouring queries (the worst case);
``--selection local`` hands the attention and the indexer's KL a sinks + recent-tokens selection
instead, as neighbouring queries of a trained indexer share most of theirs (the best case). The
indexer's scoring and top-k run in both.

    python benchmarks/dsa_attention.py [--contexts 1024 ... 32768] [--train 1024 ...] [--decode 1024 ...]
        [--selection indexer|local] [--threads 1 --cpu-time]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from moeframe.plugin import ForwardContext, ModelConfig, registry, resolve_model_config

MLA: dict[str, Any] = dict(q_lora_rank=256, kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64)
INDEXER: dict[str, Any] = dict(index_n_heads=4, index_head_dim=64, index_topk=2048)


CLOCK = time.perf_counter  # --cpu-time: time.process_time (on a shared machine wall time measures the others)


def seconds(step: Callable[[], None]) -> float:
    start = CLOCK()
    step()
    return CLOCK() - start


# matmul FLOPs of SDPA's CPU flash kernel (torch's counter knows only the GPU kernels), causal half only
def _cpu_flash(query, key, value, dropout_p=0.0, is_causal=False, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value) // (2 if is_causal else 1)


def _cpu_flash_backward(
    grad_out, query, key, value, out, logsumexp, dropout_p, is_causal, *args, out_shape=None, **kwargs
) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value) // (2 if is_causal else 1)


CPU_FLASH = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_flash_backward,
}


def gflops(kind: str, name: str, S: int) -> float:
    """Matmul GFLOPs of one step, counted on the meta device (nothing is computed); NaN where the
    step's shapes depend on data (DSA's sparse path plans its blocks from the selected indices)."""
    try:
        return _gflops(kind, name, S)
    except (NotImplementedError, RuntimeError):
        return float("nan")


def _gflops(kind: str, name: str, S: int) -> float:
    with torch.device("meta"):
        layer = build(name, max(S + 1, INDEXER["index_topk"]))
        layer.train(kind == "train")
        step = train_step(layer, S) if kind == "train" else decode_step(layer, S)
        with FlopCounterMode(display=False, custom_mapping=CPU_FLASH) as counter:
            step()
    return counter.get_total_flops() / 1e9


SELECTION = "indexer"  # --selection local: the attention gets a local + sink selection (see local_sink)
SINKS = 64


def local_sink(cls: type) -> type:
    """The layer with a trained indexer's kind of selection: each query attends to the first
    ``SINKS`` tokens and its most recent K - SINKS ones, so neighbouring queries share almost all
    of their K tokens. The indexer still scores every token and runs its top-k (the same work),
    but the attention and the indexer's KL (and its gradient) get the local selection. With random
    weights the indexer's own selections barely overlap (the worst case for sharing); this is the
    best case. The KL's value is not meaningful here (its scores are left at 0: only the cost of
    its gradient, which the selection decides, is measured)."""
    from moeframe_dsa.indexer import QUERY_CHUNK, selected_scores

    class LocalSink(cls):
        _local: tuple[torch.Tensor, torch.Tensor] | None = None  # the same every step: built once

        def _select(self, x_idx_BTD, q_idx_BTQ, k_index_BSI, cos_TP, sin_TP, ctx):  # noqa: ANN001, ANN202
            with torch.no_grad():  # the indexer's scoring and top-k: its work, not its choice
                super()._select(x_idx_BTD, q_idx_BTQ, k_index_BSI, cos_TP, sin_TP, ctx)
            (B, T, _), S, K = x_idx_BTD.shape, k_index_BSI.shape[1], self.index_topk
            if self._local is None or self._local[0].shape != (B, T, K):
                self._local = local_selection(torch.Size((B, T, K)), S, x_idx_BTD.device)
            idx_BTK, keep_BTK = self._local
            if not (self.training and torch.is_grad_enabled()):
                return idx_BTK, keep_BTK, None
            q_BTGI, w_BTG = self.indexer.queries(x_idx_BTD, q_idx_BTQ, cos_TP, sin_TP)
            k_BSI, scores = k_index_BSI.float(), []
            for t0 in range(0, T, QUERY_CHUNK):
                t1 = min(T, t0 + QUERY_CHUNK)
                seen = min(S, max(S - T + t1, K))
                idx_BtK = idx_BTK[:, t0:t1]
                values_BtK = torch.zeros(idx_BtK.shape)
                scores.append(selected_scores(q_BTGI[:, t0:t1], w_BTG[:, t0:t1], k_BSI[:, :seen], idx_BtK, values_BtK))
            return idx_BTK, keep_BTK, torch.cat(scores, dim=1)

    return LocalSink


def local_selection(shape: torch.Size, S: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Sinks + recent tokens of each query [B,T,K], and which of them it may see [B,T,K]."""
    B, T, K = shape
    pos_T1 = torch.arange(S - T, S, device=device)[:, None]
    sinks_S = torch.arange(SINKS, device=device)
    recent_TK = pos_T1 - torch.arange(K - SINKS, device=device)
    local_TK = torch.cat((sinks_S.expand(T, SINKS), recent_TK.clamp(min=0)), dim=1)
    # early queries: a sink is hidden until seen, a recent token that is a sink is not taken twice
    keep_TK = torch.cat((sinks_S <= pos_T1, recent_TK >= SINKS), dim=1)
    return local_TK.expand(B, T, K), keep_TK.expand(B, T, K)


def build(name: str, max_len: int) -> torch.nn.Module:
    attention = {"name": name, **MLA, **(INDEXER if name == "dsa" else {})}
    cfg = ModelConfig(dim=1024, n_heads=8, max_seq_len=max_len, attention=attention)
    torch.manual_seed(0)  # the MLA weights are drawn first, so both layers share them
    cls = registry.load("attention", name)
    if name == "dsa" and SELECTION == "local":
        cls = local_sink(cls)
    layer = cls(cfg, resolve_model_config(cfg).attention.options, 0)
    with torch.no_grad():
        for p in layer.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.02)
    return layer


def train_step(layer: torch.nn.Module, S: int) -> Callable[[], None]:
    device = layer.wo.weight.device
    x_BSD = torch.randn(1, S, 1024, device=device, requires_grad=True)
    ctx = ForwardContext(torch.arange(S, device=device), layer_id=0)

    def step() -> None:
        y = layer(x_BSD, ctx)
        loss = y.float().square().mean() + sum(layer.take_training_losses().values())
        loss.backward()

    return step


def decode_step(layer: torch.nn.Module, S: int) -> Callable[[], None]:
    device = layer.wo.weight.device
    cache = layer.new_cache(1, S + 1, device, torch.float32)
    for t in cache.tensors():
        t.normal_()
    x_B1D = torch.randn(1, 1, 1024, device=device)

    def step() -> None:
        cache.length = S  # the same S cached tokens at every repeat
        with torch.no_grad():
            layer(x_B1D, ForwardContext(torch.tensor([S], device=device), layer_id=0, cache=cache))

    return step


def timed(kind: str, S: int, repeats: int) -> tuple[float, float]:
    """The fastest of ``repeats`` runs of each layer, the two alternating: on a shared machine the
    minimum is the least disturbed figure, and alternation exposes both to the same load."""
    steps = []
    for name in ("mla", "dsa"):
        layer = build(name, max(S + 1, INDEXER["index_topk"]))
        layer.train(kind == "train")
        steps.append(train_step(layer, S) if kind == "train" else decode_step(layer, S))
    for step in steps:
        step()  # warm-up (allocator, oneDNN kernels for the shapes)
    best = [float("inf"), float("inf")]
    for _ in range(repeats):
        best = [min(t, seconds(step)) for t, step in zip(best, steps)]
    return best[0], best[1]


def crossover(rows: list[tuple[int, float, float]]) -> str:
    faster = [S for S, mla, dsa in rows if dsa < mla]
    return f"DSA cheaper from S = {faster[0]}" if faster else "no crossover in the measured range"


def report(kind: str, contexts: list[int], timed_contexts: list[int], repeats: int) -> None:
    flops = [(S, gflops(kind, "mla", S), gflops(kind, "dsa", S)) for S in contexts]
    times = {}
    for S in timed_contexts:
        times[S] = timed(kind, S, repeats)
        print(f"{kind} S={S}: mla {times[S][0] * 1e3:.1f} ms, dsa {times[S][1] * 1e3:.1f} ms", flush=True)
    print(f"\n{kind}: by FLOPs {crossover(flops)}; by time {crossover([(S, *times[S]) for S in sorted(times)])}")
    print(
        "| S | MLA GFLOP | DSA GFLOP | DSA / MLA | MLA ms | DSA ms | DSA / MLA |\n|---:|---:|---:|---:|---:|---:|---:|"
    )
    for S, mla, dsa in flops:
        t = (
            f"{times[S][0] * 1e3:.1f} | {times[S][1] * 1e3:.1f} | {times[S][1] / times[S][0]:.2f}"
            if S in times
            else "| |"
        )
        print(f"| {S} | {mla:.3g} | {dsa:.3g} | {dsa / mla:.2f} | {t} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--contexts",
        type=int,
        nargs="*",
        default=[1024, 2048, 4096, 8192, 16384, 32768],
        help="context lengths whose FLOPs are counted (meta device: nothing is computed)",
    )
    parser.add_argument("--train", type=int, nargs="*", default=[1024, 2048, 4096, 8192], help="timed training steps")
    parser.add_argument(
        "--decode", type=int, nargs="*", default=[1024, 2048, 4096, 8192, 16384, 32768], help="timed decode steps"
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cpu-time", action="store_true", help="time with the process's CPU time, not wall time")
    parser.add_argument(
        "--selection",
        choices=["indexer", "local"],
        default="indexer",
        help="indexer: the (random) indexer's top-k; local: sinks + recent tokens, as a trained indexer overlaps",
    )
    args = parser.parse_args()
    global CLOCK, SELECTION
    SELECTION = args.selection
    CLOCK = time.process_time if args.cpu_time else time.perf_counter
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, k = {INDEXER['index_topk']}, "
        f"selection {SELECTION}, {'CPU' if args.cpu_time else 'wall'} time"
    )
    report("decode", args.contexts, args.decode, args.repeats)  # the cheap one first
    report("train", args.contexts, args.train, args.repeats)


if __name__ == "__main__":
    main()
