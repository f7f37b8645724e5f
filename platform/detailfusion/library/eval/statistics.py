"""Uncertainty of retrieval figures over queries, scene clusters and seeds (docs/claims.md).

Arrays are [S, Q] (one row per seed: a seed changes initialisation and data order; one column per query of the
same benchmark, so two variants' values are paired by query) or [Q] (a per-query tag). A bootstrap resample
draws queries, or whole clusters of queries (``clusters``: one label per query, e.g. its scene root), with
replacement, the same draw for every array, and evaluates the statistic on the resampled columns; the interval is
the (bias-corrected) percentile interval of those values. The seed-level interval is Student's t over per-seed values.
"""

from __future__ import annotations

import math
from functools import lru_cache
from statistics import NormalDist
from typing import Callable, Hashable, Iterator, Sequence

import numpy as np

Statistic = Callable[[dict[str, np.ndarray]], float]
CLUSTER = "cluster"  # key of the [Q'] cluster ids a statistic receives: a cluster drawn twice has two ids
MIN_SEEDS = 5


def encode(labels: Sequence[Hashable]) -> np.ndarray:
    """[Q] int codes of ``labels`` in order of first appearance."""
    codes: dict = {}
    return np.array([codes.setdefault(x, len(codes)) for x in labels], dtype=np.int64)


def _draws(count: int, clusters: Sequence[Hashable] | None, rng: np.random.Generator,
           resamples: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(rows [Q'], cluster ids [Q']) per resample: Q queries, or as many clusters as there are, with replacement."""
    if clusters is None:
        for _ in range(resamples):
            yield rng.integers(0, count, count), np.arange(count)
        return
    codes = encode(clusters)
    order = np.argsort(codes, kind="stable")
    sizes = np.bincount(codes)
    starts = np.cumsum(sizes) - sizes
    k = len(sizes)
    for _ in range(resamples):
        drawn = rng.integers(0, k, k)
        lengths = sizes[drawn]
        within = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        yield order[np.repeat(starts[drawn], lengths) + within], np.repeat(np.arange(k), lengths)


def bootstrap_draws(statistic: Statistic, values: dict[str, np.ndarray], resamples: int = 2000, seed: int = 0,
                    clusters: Sequence[Hashable] | None = None) -> tuple[float, np.ndarray]:
    """(statistic of the full arrays, [resamples] its values on resamples; NaN where it is undefined there).
    ``values``: {name: [S, Q] or [Q]} with one Q; ``clusters``: [Q] labels, resampled whole (None: queries).
    The statistic also gets ``values[CLUSTER]``: [Q'] int cluster ids."""
    queries = {v.shape[-1] for v in values.values()}
    if len(queries) != 1:
        raise ValueError(f"paired arrays need one query count, got {sorted(queries)}")
    (count,) = queries
    if clusters is not None and len(clusters) != count:
        raise ValueError(f"clusters: one label per query needed, got {len(clusters)} for {count} queries")
    full = dict(values, **{CLUSTER: encode(clusters) if clusters is not None else np.arange(count)})
    rng = np.random.default_rng(seed)
    draws = np.array([statistic({**{name: v[..., rows] for name, v in values.items()}, CLUSTER: ids})
                      for rows, ids in _draws(count, clusters, rng, resamples)], dtype=float)
    return float(statistic(full)), draws


def percentile_interval(estimate: float, draws: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Bias-corrected percentile interval (Efron's BC) of bootstrap ``draws`` (NaN left out) around ``estimate``:
    the percentiles Phi(2 z0 +- z) with z0 = Phi^-1(share of draws below the estimate, ties counting half). An
    unbiased statistic has z0 ~ 0 (the plain percentile interval); a biased one (epsilon^2 on resamples that repeat
    queries) is shifted back."""
    draws = draws[~np.isnan(draws)]
    if not len(draws):
        return float("nan"), float("nan")
    share = (np.sum(draws < estimate) + 0.5 * np.sum(draws == estimate)) / len(draws)
    normal = NormalDist()
    z0 = normal.inv_cdf(min(max(share, 1 / (len(draws) + 1)), len(draws) / (len(draws) + 1)))
    z = normal.inv_cdf(1 - (1 - level) / 2)
    low, high = np.percentile(draws, [100 * normal.cdf(2 * z0 - z), 100 * normal.cdf(2 * z0 + z)])
    return float(low), float(high)


def bootstrap_interval(statistic: Statistic, values: dict[str, np.ndarray], resamples: int = 2000, seed: int = 0,
                       level: float = 0.95, clusters: Sequence[Hashable] | None = None) -> tuple[float, float, float]:
    """(estimate, low, high): ``statistic`` of the full arrays and its ``level`` bias-corrected percentile interval
    over ``resamples`` resamples of queries (or of ``clusters``, see ``bootstrap_draws``)."""
    estimate, draws = bootstrap_draws(statistic, values, resamples, seed, clusters)
    return (estimate, *percentile_interval(estimate, draws, level))


@lru_cache(maxsize=64)
def t_quantile(p: float, df: int) -> float:
    """Student t's ``p`` quantile (0.5 < p < 0.999) for ``df`` degrees of freedom, from its density integrated
    numerically (error < 1e-4 against tables)."""
    if not 0.5 < p < 0.999 or df < 1:
        raise ValueError(f"t_quantile needs 0.5 < p < 0.999 and df >= 1, got p={p}, df={df}")
    x = np.linspace(0.0, 400.0, 800_001)
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    density = np.exp(log_norm - (df + 1) / 2 * np.log1p(x * x / df))
    cdf = 0.5 + np.concatenate([[0.0], np.cumsum((density[1:] + density[:-1]) / 2 * (x[1] - x[0]))])
    return float(np.interp(p, cdf, x))


def seed_interval(per_seed: Sequence[float], level: float = 0.95, min_seeds: int = MIN_SEEDS) -> dict:
    """Seed-level interval of a statistic from its per-seed values: mean ± t(level, n - 1) * sd / sqrt(n).
    {"estimate", "interval_95": [low, high] (None for one seed), "seeds": n, "decides": n >= min_seeds,
    "detail": why it does not decide (None when it does)}."""
    values = np.asarray(per_seed, dtype=float)
    n = len(values)
    if n == 0 or np.isnan(values).any():
        raise ValueError(f"seed_interval needs per-seed values without NaN, got {list(values)}")
    result = {"estimate": float(values.mean()), "interval_95": None, "seeds": n, "decides": n >= min_seeds,
              "detail": None if n >= min_seeds else f"needs >= {min_seeds} seeds ({n} given)"}
    if n >= 2:
        half = t_quantile(1 - (1 - level) / 2, n - 1) * values.std(ddof=1) / math.sqrt(n)
        result["interval_95"] = [float(values.mean() - half), float(values.mean() + half)]
    return result


def epsilon_squared(x: np.ndarray, groups: np.ndarray) -> float:
    """Share of the variance of ``x`` [Q] explained by int ``groups`` [Q], adjusted for their number k:
    (SS_between - (k - 1) MS_within) / SS_total; about 0 for groups unrelated to x, whatever k; 0 for a constant x
    (nothing to explain). NaN when undefined (one group, or as many groups as values)."""
    _, g = np.unique(groups, return_inverse=True)
    n, k = len(x), int(g.max()) + 1 if len(g) else 0
    total = float(((x - x.mean()) ** 2).sum())
    if k < 2 or n <= k:
        return float("nan")
    if total == 0:
        return 0.0
    counts = np.bincount(g)
    means = np.bincount(g, weights=x) / counts
    between = float((counts * (means - x.mean()) ** 2).sum())
    within = (total - between) / (n - k)
    return (between - (k - 1) * within) / total
