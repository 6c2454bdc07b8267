"""Tokenizers: a byte-level one that needs nothing, or any HF ``tokenizer.json``.

Both expose the same small surface: ``encode(text) -> list[int]``, ``decode(ids) -> str``,
``vocab_size`` and ``eos_id`` (the id appended after every document).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from moeframe.errors import ConfigError

# EOS names used by common tokenizers, most specific first (DeepSeek-V3's comes first).
_EOS_CANDIDATES = ("<｜end▁of▁sentence｜>", "<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>")


class Tokenizer(Protocol):
    vocab_size: int
    eos_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as ids 0-255, plus EOS = 256. Lossless for any text, vocab 257."""

    vocab_size = 257
    eos_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_bytes(self, data: bytes) -> bytes:
        return data  # bytes are already their own ids: the fast path for large corpora

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A ``tokenizers`` tokenizer loaded from a local ``tokenizer.json`` (no hub access)."""

    def __init__(self, path: str | Path, eos_token: str | None = None) -> None:
        try:
            from tokenizers import Tokenizer as _HF
        except ImportError as exc:
            raise ConfigError("a tokenizer.json needs the 'tokenizers' package: pip install tokenizers") from exc
        try:
            self._tok = _HF.from_file(str(path))
        except Exception as exc:  # the tokenizers library raises a bare Exception on a damaged file
            raise ConfigError(
                f"tokenizer {path} cannot be read ({str(exc).splitlines()[0][:160]}); pass a valid HF tokenizer.json"
            ) from None
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.eos_id = self._find_eos(eos_token, path)

    def _find_eos(self, eos_token: str | None, path: str | Path) -> int:
        for name in [eos_token] if eos_token else list(_EOS_CANDIDATES):
            token_id = self._tok.token_to_id(name)
            if token_id is not None:
                return token_id
        wanted = repr(eos_token) if eos_token else f"any of {', '.join(_EOS_CANDIDATES)}"
        raise ConfigError(f"tokenizer {path} has no end-of-document token ({wanted}); set data.eos_token")

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids))


def load_tokenizer(spec: str = "byte", eos_token: str | None = None) -> Tokenizer:
    """``"byte"`` or the path of a ``tokenizer.json`` (or a folder holding one)."""
    if spec == "byte":
        return ByteTokenizer()
    path = Path(spec)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise ConfigError(
            f"data.tokenizer: {spec!r} is neither 'byte' nor an existing tokenizer.json file "
            "(pass the path of a HF tokenizer.json or the folder that holds it)"
        )
    return HFTokenizer(path, eos_token)
