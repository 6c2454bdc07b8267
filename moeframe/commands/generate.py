"""``moeframe generate CKPT --prompt TEXT``: stream a continuation from a trained checkpoint
(``moeframe.generate`` decodes; this module is its command line)."""

from __future__ import annotations

import sys
from typing import TextIO

from moeframe.commands.signature import run_function
from moeframe.errors import ConfigError


def generate(
    checkpoint: str,
    *,
    prompt: str = "",
    max_new_tokens: int = 200,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    tokenizer: str = "byte",
    no_cache: bool = False,
    stop_at_eos: bool = False,
    device: str = "cpu",
    out: TextIO | None = None,
) -> int:
    """Generate text from a PretrainModule checkpoint (greedy or top-p sampling, KV cache).

    Args:
        checkpoint: a .ckpt written by `moeframe fit` (e.g. runs/tiny/logs/version_0/checkpoints/last.ckpt)
        prompt: text to continue (empty: start after an end-of-document token)
        max_new_tokens: tokens to generate at most
        temperature: 0 = greedy (default)
        top_p: nucleus sampling mass, in (0, 1]
        seed: sampling seed
        tokenizer: 'byte' or the tokenizer.json the model was trained with
        no_cache: recompute the whole prefix at every step
        stop_at_eos: stop at the end-of-document token
        device: where the model runs
        out: where the text goes (not a flag; default stdout)
    """
    import torch

    from moeframe.data.tokenizer import load_tokenizer
    from moeframe.generate import TextStream, generate_ids, load_decoder

    out = out or sys.stdout  # looked up now: tests and callers may have replaced sys.stdout
    if max_new_tokens <= 0 or temperature < 0 or not 0 < top_p <= 1:
        raise ConfigError("need --max_new_tokens > 0, --temperature >= 0 and 0 < --top_p <= 1; change the value")
    vocab = load_tokenizer(tokenizer)
    decoder = load_decoder(checkpoint, device)
    if vocab.vocab_size > decoder.config.vocab_size:
        raise ConfigError(
            f"the tokenizer has {vocab.vocab_size} tokens but the model only "
            f"{decoder.config.vocab_size}: pass the tokenizer it was trained with (--tokenizer)"
        )
    ids = vocab.encode(prompt) or [vocab.eos_id]
    prompt_BT = torch.tensor([ids], device=device)
    new_tokens = min(max_new_tokens, decoder.config.max_seq_len - len(ids))
    if new_tokens <= 0:
        raise ConfigError(
            f"the prompt ({len(ids)} tokens) fills model.max_seq_len={decoder.config.max_seq_len}; shorten the prompt"
        )
    generator = torch.Generator(device=device).manual_seed(seed)
    stream = TextStream(vocab, out)
    out.write(prompt)
    for token_B in generate_ids(
        decoder,
        prompt_BT,
        new_tokens,
        temperature,
        top_p,
        use_cache=not no_cache,
        eos_id=vocab.eos_id if stop_at_eos else None,
        vocab_limit=vocab.vocab_size,
        generator=generator,
    ):
        stream.put(int(token_B[0]))
    stream.finish()
    out.write("\n")
    out.flush()
    return 0


def command(argv: list[str], out: TextIO | None = None) -> int:
    return run_function(generate, argv, "moeframe generate", out=out)
