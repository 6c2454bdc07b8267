"""Schedules by tokens seen, as DeepSeek-V3's recipe states them (technical report §4.2).

A schedule is a start value and a list of segments ``[until, value, shape]``: the segment ends
once ``until`` tokens have been seen, and ``shape`` says how it gets to ``value``:

- ``linear``: straight from the previous value to ``value`` (warm-up);
- ``cosine``: half a cosine from the previous value to ``value`` (decay);
- ``constant``: ``value`` for the whole segment (a plateau, or a step down at its start).

Past the last segment the last value holds. Tokens rather than steps because the global batch
grows during V3's run (the batch-size ramp), so a step is not a fixed amount of training.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

SHAPES = ("linear", "cosine", "constant")

Segment = Sequence  # [until_tokens, value, shape]


def check_segments(segments: Sequence[Segment], what: str) -> None:
    """ValueError naming ``what`` unless segments are ``[until, value, shape]`` with increasing ``until``."""
    last = 0.0
    for seg in segments:
        if not (isinstance(seg, (list, tuple)) and len(seg) == 3 and seg[2] in SHAPES):
            raise ValueError(
                f"{what}: each segment must be [until_tokens, value, shape] with shape one of "
                f"{', '.join(SHAPES)}; got {seg!r}"
            )
        if float(seg[0]) <= last:
            raise ValueError(f"{what}: segment ends must increase and be > 0, got {float(seg[0])} after {last}")
        last = float(seg[0])


def piecewise(tokens: float, start: float, segments: Sequence[Segment]) -> float:
    """The schedule's value after ``tokens`` tokens."""
    begin, previous = 0.0, float(start)
    for until, value, shape in segments:
        until, value = float(until), float(value)
        if tokens < until:
            progress = (tokens - begin) / (until - begin)
            if shape == "constant":
                return value
            if shape == "linear":
                return previous + (value - previous) * progress
            return value + (previous - value) * 0.5 * (1 + math.cos(math.pi * progress))
        begin, previous = until, value
    return previous
