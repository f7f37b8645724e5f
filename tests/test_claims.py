"""Paired bootstrap intervals, the permutation test and the claim rules, on outcomes with known truth."""

import numpy as np
import pytest
import torch

from detailfusion.eval.claims import check_claims
from detailfusion.eval.metrics import cirr_metrics, target_ranks
from detailfusion.eval.outcomes import METRICS, Outcomes, per_query
from detailfusion.eval.statistics import bootstrap_interval, difference, excess_over_best, permutation_p_value


def test_per_query_values_average_to_the_protocol_metrics():
    torch.manual_seed(0)
    scores = torch.randn(50, 30)
    targets, references = torch.randint(0, 30, (50,)), torch.zeros(50, dtype=torch.long)
    targets[targets == 0] = 1
    subset = torch.zeros(50, 30, dtype=torch.bool)
    for q in range(50):
        subset[q, [0, targets[q].item(), (targets[q].item() + 1) % 30 or 2, 7]] = True
    is_reference = torch.zeros_like(subset)
    is_reference[:, 0] = True
    values = per_query(target_ranks(scores, targets, is_reference), target_ranks(scores, targets, ~subset | is_reference))
    expected = cirr_metrics(scores, targets, references, subset)
    for metric in METRICS:
        assert values[metric].mean() == pytest.approx(expected[metric])


def test_bootstrap_interval_covers_a_known_difference_and_shrinks_with_more_queries():
    rng = np.random.default_rng(0)
    widths = []
    for queries in (200, 3200):
        a = (rng.random((2, queries)) < 0.6) * 100.0
        b = (rng.random((2, queries)) < 0.5) * 100.0
        estimate, low, high = bootstrap_interval(difference("a", "b"), {"a": a, "b": b}, resamples=500)
        assert low < estimate < high
        widths.append(high - low)
    assert low < 10 < high and low > 0  # the true difference is 10 points
    assert widths[1] < widths[0] / 2.5  # ~ 1 / sqrt(16) of the width


def test_paired_bootstrap_is_tighter_than_the_difference_of_noisy_columns():
    rng = np.random.default_rng(1)
    base = rng.normal(50, 20, (1, 500))
    a, b = base + 1.0 + rng.normal(0, 1, base.shape), base + rng.normal(0, 1, base.shape)  # paired by query
    _, low, high = bootstrap_interval(difference("a", "b"), {"a": a, "b": b}, resamples=500)
    assert 0 < low and high < 2  # pairing removes the per-query spread (sd 20)
    estimate, _, _ = bootstrap_interval(excess_over_best("a", ("b", "a")), {"a": a, "b": b}, resamples=50)
    assert estimate == 0.0


def test_permutation_test_finds_group_differences_and_not_noise():
    rng = np.random.default_rng(2)
    labels = list(rng.choice(["add", "move", "remove"], 600))
    shifted = np.array([0.6 if t == "move" else 0.4 for t in labels]) + rng.normal(0, 0.1, 600)
    noise = rng.normal(0.5, 0.1, 600)
    assert permutation_p_value([shifted], [labels], permutations=300)[1] < 0.01
    assert permutation_p_value([noise], [labels], permutations=300)[1] > 0.05


def outcomes_with(rs1_gm, rs1_di, queries=400, seeds=2, weights=None, seed=0):
    rng = np.random.default_rng(seed)
    runs = []
    for s in range(seeds):
        values = {}
        for variant, rate in {"gm": rs1_gm, "di": rs1_di, "static": rs1_gm, "afc": rs1_di}.items():
            hits = (rng.random(queries) < rate) * 100.0
            values[variant] = {m: hits for m in METRICS}
        w = weights if weights is not None else np.full((queries, 2), 0.5)
        runs.append(Outcomes([f"q{i}" for i in range(queries)], values, w))
    return runs


def test_claims_hold_when_true_fail_when_false_and_say_what_was_not_measured():
    good = check_claims({"main": outcomes_with(0.3, 0.6)}, resamples=300)
    assert good["di_above_gm_on_rs1"]["holds"] and good["di_above_gm_on_rs1"]["interval_95"][0] > 0
    assert good["afc_above_static"]["holds"]
    per_seed = good["di_above_gm_on_rs1"]["per_seed"]  # each seed's own difference; their mean is the estimate
    assert len(per_seed) == 2 and all(d > 0 for d in per_seed)
    assert np.mean(per_seed) == pytest.approx(good["di_above_gm_on_rs1"]["difference"], abs=0.01)
    assert not good["reference_negative_helps_di"]["measured"] and good["reference_negative_helps_di"]["holds"] is None
    bad = check_claims({"main": outcomes_with(0.6, 0.3)}, resamples=300)
    assert not bad["di_above_gm_on_rs1"]["holds"] and bad["di_above_gm_on_rs1"]["difference"] < 0
    # a constant compositor does not adapt; one that follows the edit type does
    assert not good["compositor_adapts"]["holds"]
    types = ["add", "move"] * 200
    rng = np.random.default_rng(3)
    a_di = np.array([0.8 if t == "move" else 0.3 for t in types]) + rng.normal(0, 0.05, 400)
    adaptive = check_claims({"main": outcomes_with(0.3, 0.6, weights=np.stack([1 - a_di, a_di], 1))}, types, 300)
    assert adaptive["compositor_adapts"]["holds"] and adaptive["compositor_adapts"]["p_value"] < 0.05
    assert adaptive["compositor_adapts"]["by_edit_type"]["move"] > adaptive["compositor_adapts"]["by_edit_type"]["add"]
