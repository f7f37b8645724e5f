"""The paper's claims, checked on per-query outcomes with 95 % paired bootstrap intervals (statistics.py).

``outcomes``: {run name: [Outcomes per seed]} over the same benchmark queries; the main run (``MAIN``) is the full
recipe (stage 1 -> stage 2 -> stage 3 AFC). A claim whose runs are absent (a pipeline run trains only the main
chain) is reported as not measured. Decision rules, fixed before looking at any result:

- "A > B": holds when the interval of the difference lies above 0.
- "A >= B": holds when the estimate is >= 0 and the interval's upper end is >= 0 (A not shown worse than B).
- adaptation: the std of a_di over test queries >= 0.05 (its interval's lower end too) and the mean a_di differs
  between edit types (permutation test of the between-type variance, p < 0.05).
"""

from __future__ import annotations

import numpy as np

from .outcomes import Outcomes
from .statistics import bootstrap_interval, difference, excess_over_best, permutation_p_value

MAIN = "main"
MIN_WEIGHT_STD = 0.05


def _stack(outcomes: dict[str, list[Outcomes]], run: str, variant: str, metric: str) -> np.ndarray:
    return np.stack([o.values[variant][metric] for o in outcomes[run]])  # [S, Q]


def _compare(outcomes, name, rule, kind, a, b, metric, resamples):
    """One claim ``a kind b`` on ``metric``; a, b: (run, variant) or b a tuple of them (the best of them)."""
    wanted = [a] + (list(b) if isinstance(b[0], tuple) else [b])
    if any(run not in outcomes for run, _ in wanted):
        return {"measured": False, "rule": rule, "holds": None, "detail": "needs runs " + ", ".join(
            sorted({run for run, _ in wanted if run not in outcomes}))}
    values = {f"{run}/{variant}": _stack(outcomes, run, variant, metric) for run, variant in wanted}
    keys = list(values)
    statistic = difference(keys[0], keys[1]) if len(keys) == 2 else excess_over_best(keys[0], tuple(keys[1:]))
    estimate, low, high = bootstrap_interval(statistic, values, resamples)
    holds = low > 0 if kind == ">" else (estimate >= 0 and high >= 0)
    means = {k: round(float(v.mean()), 2) for k, v in values.items()}
    # the same statistic seed by seed: the interval is over queries, so this shows whether seeds agree on the sign
    per_seed = [round(statistic({k: v[s:s + 1] for k, v in values.items()}), 2) for s in range(len(values[keys[0]]))]
    return {"measured": True, "rule": rule, "holds": bool(holds), "metric": metric, "difference": round(estimate, 2),
            "interval_95": [round(low, 2), round(high, 2)], "means": means, "per_seed": per_seed}


def _adapts(outcomes: dict[str, list[Outcomes]], edit_types: list[str] | None, resamples: int) -> dict:
    rule = (f"std of the AFC's a_di over test queries >= {MIN_WEIGHT_STD} (interval's lower end) and its mean differs "
            "between edit types (permutation p < 0.05)")
    runs = outcomes.get(MAIN, [])
    weights = [o.weights[:, 1] for o in runs]
    if not runs or any(np.isnan(w).any() for w in weights):
        return {"measured": False, "rule": rule, "holds": None, "detail": "no compositor weights"}
    a_di = np.stack(weights)
    estimate, low, high = bootstrap_interval(lambda v: float(v["a_di"].std(axis=-1).mean()), {"a_di": a_di}, resamples)
    result = {"measured": True, "rule": rule, "std_a_di": round(estimate, 4), "interval_95": [round(low, 4), round(high, 4)],
              "mean_a_di": round(float(a_di.mean()), 4)}
    if edit_types is None:
        result.update(holds=False, detail="no edit types for this split: the per-type half is not measured")
        return result
    statistic, p = permutation_p_value(list(a_di), [edit_types] * len(a_di))
    kinds = sorted(set(edit_types))
    result["by_edit_type"] = {k: round(float(a_di[:, [i for i, t in enumerate(edit_types) if t == k]].mean()), 4)
                              for k in kinds}
    result.update(between_type_variance=statistic, p_value=round(p, 4), holds=bool(low >= MIN_WEIGHT_STD and p < 0.05))
    return result


def check_claims(outcomes: dict[str, list[Outcomes]], edit_types: list[str] | None = None,
                 resamples: int = 2000, compositor: str = "afc") -> dict[str, dict]:
    """{claim: {measured, holds, rule, difference, interval_95, means, ...}} (see the module's decision rules);
    ``compositor``: the main model's compositor variant (the paper's AFC)."""
    main = lambda variant: (MAIN, compositor if variant == "afc" else variant)  # noqa: E731
    return {
        "di_above_gm_on_rs1": _compare(outcomes, "di_above_gm_on_rs1", "DI-only Rs@1 > GM-only Rs@1", ">",
                                       main("di"), main("gm"), "Rs@1", resamples),
        "afc_at_least_best_branch": _compare(outcomes, "afc_at_least_best_branch", "AFC Avg >= max(GM-only, DI-only) Avg",
                                             ">=", main("afc"), (main("gm"), main("di")), "Avg", resamples),
        "afc_above_static": _compare(outcomes, "afc_above_static", "AFC Avg > static fusion Avg", ">", main("afc"),
                                     main("static"), "Avg", resamples),
        "reference_negative_helps_di": _compare(
            outcomes, "reference_negative_helps_di", "DI-only Rs@1 > DI-only Rs@1 trained without the reference negative",
            ">", main("di"), ("no_reference_negative", "di"), "Rs@1", resamples),
        "stage1_helps_di": _compare(outcomes, "stage1_helps_di", "DI-only Avg > DI-only Avg trained without stage 1",
                                    ">", main("di"), ("no_stage1", "di"), "Avg", resamples),
        "compositor_adapts": _adapts(outcomes, edit_types, resamples),
    }
