"""Whether a training loss fell, with a scale and a stated null distribution (test helper; issue 35, point 6)."""

from __future__ import annotations

import numpy as np
from scipy import stats


def falls(rows, alpha: float = 0.01, min_drop: float = 0.01):
    """Whether the loss fell by more than its own step-to-step noise allows *and* by at least ``min_drop`` of its
    starting level. ``rows``: [(step, loss)] in step order.

    Statistic: d = mean(first k losses) - mean(last k), k = max(4, n // 4). Noise: the per-step sd estimated from
    successive differences over the whole run, s^2 = sum((x[i+1] - x[i])^2) / (2 (n - 1)) (von Neumann's estimator:
    a smooth fall adds only its squared per-step slope, so s errs high and the test on the safe side). Null: losses
    independent with a common mean and sd sigma; then d / (s sqrt(2 / k)) is approximately Student t with
    nu = 2 (n - 1)^2 / (3 n - 4) degrees of freedom (Satterthwaite's match of s^2's variance for Gaussian noise, whose
    successive differences are correlated: nu is about 2n/3, not n - 1 or 2k - 2). One-sided at ``alpha``. The
    scale: d must also be at least ``min_drop`` x the first window's mean (a fall that is real but negligible, e.g.
    a steady 0.15 % decline with no noise, does not count; the smallest fall the training tests see is stage 3's
    compositor on cached outputs, 2.5 % with t 31.7). Returns (ok, figures)."""
    values = np.asarray([loss for _, loss in rows], dtype=float)
    n = len(values)
    if n < 8:
        raise ValueError(f"{n} logged steps: at least 8 are needed to judge a fall")
    k = max(4, n // 4)
    first, last = float(values[:k].mean()), float(values[-k:].mean())
    sd = float(np.sqrt(np.sum(np.diff(values) ** 2) / (2 * (n - 1))))
    nu = 2 * (n - 1) ** 2 / (3 * n - 4)
    t = (first - last) / max(sd * np.sqrt(2 / k), 1e-12)
    critical = float(stats.t.ppf(1 - alpha, nu))
    drop = (first - last) / abs(first)
    figures = {"first": round(first, 4), "last": round(last, 4), "steps_each": k, "noise_sd": round(sd, 4),
               "t": round(float(t), 2), "df": round(nu, 1), "t_critical": round(critical, 2),
               "relative_drop": round(float(drop), 4)}
    print(f"loss first vs last {k} steps: {figures}")
    return bool(t > critical and drop >= min_drop), figures
