"""Token schedules at their breakpoints, with DeepSeek-V3's numbers (technical report §4.2)."""

from __future__ import annotations

import pytest

from moeframe.training.schedules import check_segments, piecewise

T = 1e12
# LR: warm-up to 2.2e-4, constant to 10T, cosine to 2.2e-5 over 4.3T, then 2.2e-5 for 333B, 7.3e-6 for 167B
V3_LR = [
    [25.2e9, 2.2e-4, "linear"],
    [10 * T, 2.2e-4, "constant"],
    [14.3 * T, 2.2e-5, "cosine"],
    [14.633 * T, 2.2e-5, "constant"],
    [14.8 * T, 7.3e-6, "constant"],
]


@pytest.mark.parametrize(
    ("tokens", "expected"),
    [
        (0, 0.0),
        (12.6e9, 1.1e-4),
        (25.2e9, 2.2e-4),
        (5 * T, 2.2e-4),
        (10 * T, 2.2e-4),
        (12.15 * T, (2.2e-4 + 2.2e-5) / 2),  # halfway through the cosine
        (14.3 * T, 2.2e-5),
        (14.5 * T, 2.2e-5),
        (14.633 * T, 7.3e-6),
        (14.7 * T, 7.3e-6),
        (20 * T, 7.3e-6),
    ],
)
def test_v3_learning_rate_breakpoints(tokens: float, expected: float) -> None:
    assert piecewise(tokens, 0.0, V3_LR) == pytest.approx(expected, rel=1e-9, abs=1e-15)


def test_v3_gamma_and_lambda_schedules() -> None:
    gamma = [[14.3 * T, 0.001, "constant"], [14.8 * T, 0.0, "constant"]]
    lam = [[10 * T, 0.3, "constant"], [14.8 * T, 0.1, "constant"]]
    assert [piecewise(t * T, 0.001, gamma) for t in (0, 14.29, 14.3, 14.8)] == [0.001, 0.001, 0.0, 0.0]
    assert [piecewise(t * T, 0.3, lam) for t in (0, 9.99, 10, 14)] == [0.3, 0.3, 0.1, 0.1]


def test_batch_ramp_shape() -> None:
    ramp = [[469e9, 15360, "linear"]]
    assert [piecewise(t, 3072, ramp) for t in (0, 234.5e9, 469e9, 1e12)] == [3072, 9216, 15360, 15360]


def test_bad_segments_are_rejected() -> None:
    with pytest.raises(ValueError, match="shape one of linear, cosine, constant"):
        check_segments([[10, 1.0, "exp"]], "optim.token_schedule")
    with pytest.raises(ValueError, match="must increase"):
        check_segments([[10, 1.0, "linear"], [5, 0.5, "cosine"]], "optim.token_schedule")
