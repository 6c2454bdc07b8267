"""Is the data path ever the bottleneck? Prepare throughput and loader throughput, side by side
with what the tiny model consumes per training step on this machine.

    python benchmarks/data_throughput.py [--max-bytes 20000000] [--steps 30]

Prints: prepare tokens/s with 1 and 2 workers; DataLoader tokens/s (windows read with pread, shuffled,
0 and 2 workers); tiny-model training tokens/s (forward + backward + AdamW); and the ratio of
loader supply to model demand (above 1: the loader keeps up).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from moeframe.config import OptimConfig
from moeframe.data.prepare import prepare, stdlib_sources
from moeframe.data.shards import PretrainDataModule
from moeframe.model.decoder import build_decoder
from moeframe.training.optim import build_optimizer
from moeframe.training.pretrain import next_token_loss

SEQ_LEN, BATCH = 256, 16


def prepare_rate(max_bytes: int, workers: int, root: Path, tokenizer: str = "byte") -> float:
    name = f"{Path(tokenizer).stem}-w{workers}"
    summary = prepare(stdlib_sources(max_bytes), root / name, tokenizer=tokenizer, workers=workers, quiet=True)
    return summary.tokens_per_second


def train_bpe(root: Path, sample_bytes: int = 2_000_000) -> str:
    """A 4k-token byte-level BPE trained on the corpus: the cost profile of a real tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    texts = [s.path.read_text(errors="replace") for s in stdlib_sources(sample_bytes)]
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=4096, special_tokens=["<|endoftext|>"]))
    path = root / "bpe.json"
    tok.save(str(path))
    return str(path)


def loader_rate(folder: Path, workers: int, batches: int) -> float:
    dm = PretrainDataModule(path=str(folder), seq_len=SEQ_LEN, batch_size=BATCH, num_workers=workers)
    dm.setup("fit")
    it = iter(dm.train_dataloader())
    next(it)  # worker start-up is paid once per epoch, not per step
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * BATCH * SEQ_LEN / (time.perf_counter() - start)


def model_rate(steps: int) -> float:
    import yaml

    from moeframe.config import ModelConfig

    cfg = ModelConfig(**yaml.safe_load(Path(__file__).parents[1].joinpath("configs/model/tiny.yaml").read_text()))
    torch.manual_seed(0)
    decoder = build_decoder(cfg)
    opt, _ = build_optimizer(decoder, OptimConfig(), steps + 2)
    ids = torch.randint(0, 257, (BATCH, SEQ_LEN + 1))

    def step() -> None:
        out = decoder(ids[:, :-1])
        (next_token_loss(out.logits, ids[:, 1:]) + out.aux_loss).backward()
        opt.step()
        opt.zero_grad()

    step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * BATCH * SEQ_LEN / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--max-bytes", type=int, default=20_000_000)
    p.add_argument("--batches", type=int, default=300)
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        rows = [(f"prepare, byte tokens, {w} worker(s)", prepare_rate(args.max_bytes, w, root)) for w in (1, 2)]
        bpe = train_bpe(root)
        rows += [(f"prepare, BPE-4k tokens, {w} worker(s)", prepare_rate(args.max_bytes, w, root, bpe)) for w in (1, 2)]
        rows += [(f"loader, {w} worker(s)", loader_rate(root / "byte-w2", w, args.batches)) for w in (0, 2)]
    demand = model_rate(args.steps)
    rows.append(("tiny model training (fwd+bwd+AdamW)", demand))
    width = max(len(name) for name, _ in rows)
    print(f"{'what':<{width}}  {'tokens/s':>14}  {'x model demand':>14}")
    for name, rate in rows:
        print(f"{name:<{width}}  {rate:>14,.0f}  {rate / demand:>14.1f}")


if __name__ == "__main__":
    main()
