"""The loss-fall check of the training tests (``loss_trend.falls``) on known-true and known-false curves, and its
false-positive rate under its null measured by simulation (issue 35, point 6)."""

import numpy as np
import pytest
from loss_trend import falls


def rows(values):
    return list(enumerate(values, start=1))


@pytest.mark.parametrize("n", [24, 48, 80])
def test_pure_noise_passes_at_about_the_stated_rate(n):
    """3,000 flat Gaussian-noise curves of each length the training tests log: the rate of 'fell' stays near
    alpha = 0.01 (measured 0.0103, 0.0070, 0.0077 at n 24, 48, 80; binomial sd at 0.01: 0.0018; bound 0.02)."""
    rng = np.random.default_rng(n)
    passed = sum(falls(rows(3 + 0.2 * rng.standard_normal(n)), min_drop=0.0)[0] for _ in range(3000))
    assert passed / 3000 <= 0.02, passed


def test_a_real_fall_passes_and_a_negligible_or_a_rising_one_does_not():
    rng = np.random.default_rng(0)
    decay = 2.0 + 1.5 * np.exp(-np.arange(48) / 10)  # 3.5 -> ~2.0
    assert falls(rows(decay + 0.1 * rng.standard_normal(48)))[0]
    assert not falls(rows(3 - 0.0001 * np.arange(48)))[0]  # steady, noiseless, 0.15 % in all: no scale to speak of
    assert not falls(rows(3 + 0.01 * np.arange(48) + 0.05 * rng.standard_normal(48)))[0]  # rising
    assert not falls(rows(decay[::-1] + 0.1 * rng.standard_normal(48)))[0]
    with pytest.raises(ValueError, match="at least 8"):
        falls(rows([3, 2, 1]))
