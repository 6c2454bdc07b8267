"""Text generation from a trained checkpoint (the command: ``moeframe generate CKPT --prompt TEXT``).

Decoding is incremental: the prompt goes through the decoder once (prefill), filling every
layer's KV cache (``Decoder.new_cache``; what a layer stores is its attention plugin's business:
per-head keys and values for ``mha``, a 576-value latent for ``mla``), then each step feeds only the
newest token. ``use_cache=False`` (``--no_cache``) recomputes the whole prefix at every step instead: slower, and the
reference the cache is tested against.

Choosing the next token: greedy (``--temperature 0``, the default) takes the most likely one;
otherwise the logits are divided by the temperature and sampled from the smallest set of tokens
whose probability reaches ``--top_p`` (nucleus sampling). Tokens the tokenizer cannot decode
(``model.vocab_size`` is often rounded up past the tokenizer's) are never chosen. Text is printed
as soon as it decodes to whole characters.

Shapes: B batch, T tokens, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

import torch

from moeframe.config import ConfigError
from moeframe.model.decoder import Decoder, build_decoder, materialize

__all__ = ["load_decoder", "top_p_filter", "next_token", "generate_ids", "TextStream"]


def load_decoder(checkpoint: str | Path, device: str | torch.device = "cpu") -> Decoder:
    """The decoder of a PretrainModule Lightning checkpoint, in eval mode.

    Read with ``weights_only=True`` (no arbitrary unpickling): ``moeframe.config`` registers
    ModelConfig/OptimConfig as safe, which is all a PretrainModule checkpoint holds beyond tensors
    and plain data.
    """
    from moeframe.convert.hf import load_moeframe, model_config_of_checkpoint, read_checkpoint_file
    from moeframe.errors import CheckpointError

    path = Path(checkpoint)
    if not path.exists():
        raise ConfigError(f"checkpoint {str(checkpoint)!r} does not exist (pass a .ckpt written by `moeframe fit`)")
    ckpt = read_checkpoint_file(path)
    config = model_config_of_checkpoint(ckpt, path)
    if (ckpt.get("moeframe_finetune") or {}).get("method") == "lora":  # adapters: rebuild and merge them
        return load_moeframe(path).to(device).eval()
    state = {k.removeprefix("decoder."): v for k, v in ckpt["state_dict"].items() if k.startswith("decoder.")}
    decoder = materialize(build_decoder(config, device="meta"), device)
    try:
        decoder.load_state_dict(state, strict=True)
    except RuntimeError:
        from moeframe.training.checkpoint_io import state_dict_differences  # only a failed load needs it

        detail = state_dict_differences(decoder.state_dict(), state)
        if not detail:
            raise  # not a mismatch: a bug, with its traceback
        raise CheckpointError(
            f"{path}: the weights do not match the model config stored with them "
            f"({detail[:300]}); the checkpoint is damaged: copy it again or pass another"
        ) from None
    return decoder.eval()


def top_p_filter(probs_BV: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the most likely tokens until their mass reaches ``top_p`` (always at least one);
    zero the rest and renormalise."""
    sorted_BV, order_BV = probs_BV.sort(dim=-1, descending=True)
    mass_before_BV = sorted_BV.cumsum(dim=-1) - sorted_BV  # mass of the strictly more likely tokens
    sorted_BV = sorted_BV.masked_fill(mass_before_BV >= top_p, 0.0)
    kept_BV = torch.zeros_like(probs_BV).scatter(-1, order_BV, sorted_BV)
    return kept_BV / kept_BV.sum(dim=-1, keepdim=True)


def next_token(
    logits_BV: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0, generator: torch.Generator | None = None
) -> torch.Tensor:
    """The next token id per sequence [B]: argmax at temperature 0, else top-p sampling."""
    if temperature <= 0:
        return logits_BV.argmax(dim=-1)
    probs_BV = torch.softmax(logits_BV.float() / temperature, dim=-1)
    if top_p < 1.0:
        probs_BV = top_p_filter(probs_BV, top_p)
    return torch.multinomial(probs_BV, 1, generator=generator)[:, 0]


@torch.no_grad()
def generate_ids(
    decoder: Decoder,
    prompt_BT: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    use_cache: bool = True,
    eos_id: int | None = None,
    vocab_limit: int | None = None,
    generator: torch.Generator | None = None,
) -> Iterator[torch.Tensor]:
    """Yield the next token of every sequence [B], step by step (at most ``max_new_tokens``).

    Stops early when every sequence has just produced ``eos_id``. ``vocab_limit``: ids at or above
    it are never produced. Prompt plus new tokens must fit in ``model.max_seq_len``.
    """
    B, T = prompt_BT.shape
    if T + max_new_tokens > decoder.config.max_seq_len:
        raise ValueError(
            f"prompt ({T} tokens) + max_new_tokens ({max_new_tokens}) exceeds "
            f"model.max_seq_len={decoder.config.max_seq_len}; ask for fewer tokens"
        )
    cache = decoder.new_cache(B, T + max_new_tokens) if use_cache else None
    ids_BT = prompt_BT
    step_input_BT = prompt_BT
    for _ in range(max_new_tokens):
        logits_BTV = decoder(step_input_BT if use_cache else ids_BT, cache=cache).logits
        logits_BV = logits_BTV[:, -1].float()
        if vocab_limit is not None:
            logits_BV[:, vocab_limit:] = float("-inf")
        token_B = next_token(logits_BV, temperature, top_p, generator)
        yield token_B
        if eos_id is not None and bool((token_B == eos_id).all()):
            return
        step_input_BT = token_B[:, None]
        ids_BT = torch.cat((ids_BT, step_input_BT), dim=1)


class TextStream:
    """Print decoded text as tokens arrive, holding back an incomplete UTF-8 character."""

    def __init__(self, tokenizer, out: TextIO) -> None:  # tokenizer: moeframe.data.tokenizer.Tokenizer
        self.tokenizer, self.out = tokenizer, out
        self.ids: list[int] = []
        self.printed = ""

    def put(self, token_id: int) -> None:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return  # the character is not complete yet
        self.out.write(text[len(self.printed) :])
        self.out.flush()
        self.printed = text

    def finish(self) -> None:
        """Print what was held back (generation ended inside a character)."""
        text = self.tokenizer.decode(self.ids)
        self.out.write(text[len(self.printed) :])
        self.printed = text


def __getattr__(name: str) -> Any:
    # the command front-end that lived here before moeframe.commands (deprecated, one release)
    from moeframe.deprecated_commands import old_name

    return old_name(__name__, name)


if __name__ == "__main__":  # `python -m moeframe.generate ARGS` (deprecated: `moeframe generate ARGS`)
    import sys

    from moeframe.deprecated_commands import old_name

    sys.exit(old_name("moeframe.generate", "generate_command")(sys.argv[1:]))
