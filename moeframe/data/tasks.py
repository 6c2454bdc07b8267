"""The embedded fine-tuning task: string transformations stated in words, generated locally.

A fine-tuning demo needs a skill the pretrained model does not have yet, that a byte-level
model can learn in minutes on a CPU, and whose success is unambiguous: exact-match of a short
answer. Pretraining on source code teaches copying but not these instructions, so held-out
exact-match starts near 0 and moves only if fine-tuning works.

Each example is ``{"prompt": "Write 'kqz' in capital letters.", "response": "KQZ"}`` (or
reversed, or with its letters doubled). Words are random lowercase strings, so nothing can be
memorised from pretraining; the held-out split is a fixed set of words never seen in training
(the split depends only on ``seed``, never on ``num_train``).
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable

# name -> (instruction template, transformation)
OPERATIONS: dict[str, tuple[str, Callable[[str], str]]] = {
    "upper": ("Write '{word}' in capital letters.", str.upper),
    "reverse": ("Write '{word}' backwards.", lambda w: w[::-1]),
    "double": ("Write every letter of '{word}' twice.", lambda w: "".join(c + c for c in w)),
}


def _words(rng: random.Random, count: int, min_len: int, max_len: int) -> list[str]:
    seen: dict[str, None] = {}
    while len(seen) < count:
        n = rng.randint(min_len, max_len)
        seen.setdefault("".join(rng.choice(string.ascii_lowercase) for _ in range(n)), None)
    return list(seen)


def word_task(
    num_train: int = 4000,
    num_val: int = 200,
    operations: tuple[str, ...] = ("upper", "reverse"),
    min_len: int = 3,
    max_len: int = 5,
    seed: int = 0,
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """(train, held-out) prompt/response pairs; held-out words never occur in training."""
    unknown = [op for op in operations if op not in OPERATIONS]
    if unknown or not operations:
        raise ValueError(f"unknown task operations {unknown}; choose from {sorted(OPERATIONS)}")
    held_out = _words(random.Random(seed), num_val, min_len, max_len)
    banned = set(held_out)
    rng = random.Random(seed + 1)
    train_words = [w for w in _words(rng, num_train + num_val, min_len, max_len) if w not in banned][:num_train]

    def examples(words: list[str], rng: random.Random) -> list[dict[str, str]]:
        out = []
        for word in words:
            template, transform = OPERATIONS[operations[rng.randrange(len(operations))]]
            out.append({"prompt": template.format(word=word), "response": transform(word)})
        return out

    return examples(train_words, random.Random(seed + 2)), examples(held_out, random.Random(seed + 3))
