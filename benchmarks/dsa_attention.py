"""One DeepSeek Sparse Attention layer against dense MLA over the context length, on the CPU.

The same MLA weights run twice: as attention ``mla`` (dense) and as attention ``dsa`` (the same
MLA plus a lightning indexer, top-k selection). For each context length S:

- training step: forward + backward over S tokens (``dsa`` in its sparse mode, indexer KL
  included, as a stage-2 training step computes it);
- decode: one new token against a cache of S tokens (MLA's absorbed latent cache; DSA's also
  holds the index keys), the cache filled with random rows (only its size matters here).

What to expect: dense attention grows with S per query (S²/2 per sequence in training), DSA's main
attention with k per query; the indexer still scores all S tokens, but with few heads and one
shared key. Below S = k, DSA selects every token and runs dense MLA plus the indexer: slower. The
crossover is the first S at which DSA is faster. This is a plain-PyTorch reference (gathered
rows, chunked and recomputed in backward), not the release's fused FP8 kernels: the crossover on
a GPU with those kernels comes much earlier.

The default shape is V3's attention narrowed to fit a shared 2-core CPU: dim 1024, 8 heads of
MLA (q_lora 256, kv_lora 256, nope/rope/v 64/32/64), an indexer of 4 heads × 64 (the release's
ratio of indexer to MLA heads, 64:128), k = 2048 (the release's).

    python benchmarks/dsa_attention.py [--train 1024 2048 4096 8192] [--decode 1024 ... 32768]
"""

from __future__ import annotations

import argparse
import time
from typing import Any, Callable

import torch

from moeframe.plugin import ForwardContext, ModelConfig, registry, resolve_model_config

MLA: dict[str, Any] = dict(q_lora_rank=256, kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64)
INDEXER: dict[str, Any] = dict(index_n_heads=4, index_head_dim=64, index_topk=2048)


def seconds(step: Callable[[], None]) -> float:
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def build(name: str, max_len: int) -> torch.nn.Module:
    attention = {"name": name, **MLA, **(INDEXER if name == "dsa" else {})}
    cfg = ModelConfig(dim=1024, n_heads=8, max_seq_len=max_len, attention=attention)
    torch.manual_seed(0)  # the MLA weights are drawn first, so both layers share them
    layer = registry.load("attention", name)(cfg, resolve_model_config(cfg).attention.options, 0)
    with torch.no_grad():
        for p in layer.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.02)
    return layer


def train_step(layer: torch.nn.Module, S: int) -> Callable[[], None]:
    x_BSD = torch.randn(1, S, 1024, requires_grad=True)
    ctx = ForwardContext(torch.arange(S), layer_id=0)

    def step() -> None:
        y = layer(x_BSD, ctx)
        loss = y.float().square().mean() + sum(layer.take_training_losses().values())
        loss.backward()

    return step


def decode_step(layer: torch.nn.Module, S: int) -> Callable[[], None]:
    cache = layer.new_cache(1, S + 1, torch.device("cpu"), torch.float32)
    for t in cache.tensors():
        t.normal_()
    x_B1D = torch.randn(1, 1, 1024)

    def step() -> None:
        cache.length = S  # the same S cached tokens at every repeat
        with torch.no_grad():
            layer(x_B1D, ForwardContext(torch.tensor([S]), layer_id=0, cache=cache))

    return step


def measure(kind: str, contexts: list[int], repeats: int) -> list[tuple[int, float, float]]:
    """The fastest of ``repeats`` runs of each, the two layers alternating: on a shared machine the
    minimum is the least disturbed figure, and alternation exposes both to the same load."""
    rows = []
    for S in contexts:
        steps = []
        for name in ("mla", "dsa"):
            layer = build(name, max(S + 1, INDEXER["index_topk"]))
            layer.train(kind == "train")
            steps.append(train_step(layer, S) if kind == "train" else decode_step(layer, S))
        for step in steps:
            step()  # warm-up (allocator, oneDNN kernels for the shapes)
        timings = [float("inf"), float("inf")]
        for _ in range(repeats):
            timings = [min(t, seconds(step)) for t, step in zip(timings, steps)]
        rows.append((S, *timings))
        print(f"{kind:6s} S={S:6d}  mla {timings[0] * 1e3:10.1f} ms   dsa {timings[1] * 1e3:10.1f} ms   "
              f"dsa/mla {timings[1] / timings[0]:5.2f}", flush=True)
    return rows


def crossover(rows: list[tuple[int, float, float]]) -> str:
    faster = [S for S, mla, dsa in rows if dsa < mla]
    return f"DSA faster from S = {faster[0]}" if faster else "no crossover in the measured range"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, nargs="*", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--decode", type=int, nargs="*", default=[1024, 2048, 4096, 8192, 16384, 32768])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, k = {INDEXER['index_topk']}")
    for kind, contexts in (("decode", args.decode), ("train", args.train)):  # the cheap one first
        rows = measure(kind, contexts, args.repeats)
        print(f"{kind}: {crossover(rows)}")
        print("| S | mla ms | dsa ms | dsa / mla |\n|---:|---:|---:|---:|")
        for S, mla, dsa in rows:
            print(f"| {S} | {mla * 1e3:.1f} | {dsa * 1e3:.1f} | {dsa / mla:.2f} |")


if __name__ == "__main__":
    main()
