"""Uncertainty of retrieval figures over queries and seeds: paired bootstrap intervals and a permutation test.

Arrays are [S, Q]: one row per seed (a seed changes initialisation and data order), one column per query of the
same benchmark, so two variants' values are paired by query. A bootstrap resample draws Q queries with
replacement (the same draw for every seed and every variant of the statistic) and evaluates the statistic on the
resampled columns; the interval is the percentile interval of those values.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

Statistic = Callable[[dict[str, np.ndarray]], float]


def bootstrap_interval(statistic: Statistic, values: dict[str, np.ndarray], resamples: int = 2000, seed: int = 0,
                       level: float = 0.95) -> tuple[float, float, float]:
    """(estimate, low, high): ``statistic`` of the full arrays and its ``level`` percentile interval over
    ``resamples`` query resamples. ``values``: {name: [S, Q]} with one Q for all."""
    queries = {v.shape[-1] for v in values.values()}
    if len(queries) != 1:
        raise ValueError(f"paired arrays need one query count, got {sorted(queries)}")
    (count,) = queries
    rng = np.random.default_rng(seed)
    draws = np.empty(resamples)
    for i in range(resamples):
        rows = rng.integers(0, count, count)
        draws[i] = statistic({name: v[..., rows] for name, v in values.items()})
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(draws, [tail, 100 - tail])
    return float(statistic(values)), float(low), float(high)


def difference(a: str, b: str) -> Statistic:
    """Mean over seeds and queries of ``a - b``."""
    return lambda v: float((v[a] - v[b]).mean())


def excess_over_best(a: str, others: tuple[str, ...]) -> Statistic:
    """``mean(a)`` minus the best of ``mean(o)`` for o in others (means over seeds and queries)."""
    return lambda v: float(v[a].mean() - max(v[o].mean() for o in others))


def permutation_p_value(values: list[np.ndarray], labels: list[list[str]], permutations: int = 2000,
                        seed: int = 0) -> tuple[float, float]:
    """(statistic, p): do per-query ``values`` differ in mean between label groups? The statistic is the
    between-group variance of group means (weighted by group size), averaged over seeds (one array and one label
    list per seed); labels are permuted within each seed. p counts permutations at least as extreme (+1 smoothed)."""
    rng = np.random.default_rng(seed)
    encoded = []
    for labels_of_seed in labels:
        names = sorted(set(labels_of_seed))
        encoded.append(np.array([names.index(x) for x in labels_of_seed]))

    def between(groups: list[np.ndarray]) -> float:
        total = 0.0
        for x, g in zip(values, groups):
            counts = np.bincount(g)
            means = np.bincount(g, weights=x) / np.maximum(counts, 1)
            total += float((counts * (means - x.mean()) ** 2).sum() / len(x))
        return total / len(values)

    observed = between(encoded)
    extreme = sum(between([rng.permutation(g) for g in encoded]) >= observed for _ in range(permutations))
    return observed, (extreme + 1) / (permutations + 1)
