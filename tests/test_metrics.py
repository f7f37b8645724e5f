"""Metric and submission tests on hand-computed toy rankings (ties, reference in the top-k, subset edge cases)."""

import json

import pytest
import torch

from detailfusion.library.eval.metrics import cirr_metrics, fashioniq_metrics, recall_at_k, target_ranks, top_k
from detailfusion.library.eval.submission import (
    SubmissionError,
    check_submission,
    load_submission,
    score_cirr,
    submission,
)


def test_target_rank_counts_better_candidates_and_earlier_ties():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.5, 0.2]])
    # target 3 (0.5): one strictly better (index 1) and one earlier tie (index 2) -> rank 2
    assert target_ranks(scores, torch.tensor([3])).tolist() == [2]
    # target 2 (0.5): the later tie (index 3) does not count -> rank 1
    assert target_ranks(scores, torch.tensor([2])).tolist() == [1]
    # excluding the better candidate moves the target up
    exclude = torch.tensor([[False, True, False, False, False]])
    assert target_ranks(scores, torch.tensor([3]), exclude).tolist() == [1]


def test_all_equal_scores_rank_by_gallery_order():
    scores = torch.zeros(3, 4)
    assert target_ranks(scores, torch.tensor([0, 2, 3])).tolist() == [0, 2, 3]
    assert top_k(scores, 3).tolist() == [[0, 1, 2]] * 3


def test_top_k_agrees_with_target_ranks_under_random_ties():
    generator = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 4, (50, 12), generator=generator).float()  # many ties
    exclude = torch.rand(50, 12, generator=generator) < 0.2
    targets = torch.tensor([int(torch.nonzero(~row)[0]) for row in exclude])
    ranks = target_ranks(scores, targets, exclude)
    order = top_k(scores, int((~exclude).sum(1).min()), exclude)
    for q in range(50):
        listed = order[q].tolist()
        if targets[q] in listed:
            assert listed.index(int(targets[q])) == ranks[q]
        else:
            assert ranks[q] >= len(listed)
        assert not exclude[q, order[q]].any()


def test_excluded_target_and_short_rankings_are_errors():
    with pytest.raises(ValueError, match="excluded"):
        target_ranks(torch.zeros(1, 3), torch.tensor([1]), torch.tensor([[False, True, False]]))
    with pytest.raises(ValueError, match="fewer than k=3"):
        top_k(torch.zeros(1, 3), 3, torch.tensor([[False, True, False]]))


def test_recall_at_k_in_percent():
    assert recall_at_k(torch.tensor([0, 1, 4, 9]), (1, 5)) == {"R@1": 25.0, "R@5": 75.0}
    with pytest.raises(ValueError):
        recall_at_k(torch.tensor([], dtype=torch.long), (1,))


def toy_cirr():
    """Gallery of 6 images; 2 queries. Hand-computed ranks below."""
    scores = torch.tensor(
        [
            # q0: reference 0 is the best match (must be removed), target 2, subset {0, 1, 2, 3}
            [0.99, 0.80, 0.70, 0.75, 0.10, 0.90],
            # q1: reference 5, target 4; tie between 1 and 4 (1 comes first), subset {4, 5}
            [0.20, 0.60, 0.30, 0.10, 0.60, 0.95],
        ]
    )
    targets, references = torch.tensor([2, 4]), torch.tensor([0, 5])
    subset = torch.zeros(2, 6, dtype=torch.bool)
    subset[0, [0, 1, 2, 3]] = True
    subset[1, [4, 5]] = True
    return scores, targets, references, subset


def test_cirr_metrics_hand_computed():
    scores, targets, references, subset = toy_cirr()
    metrics = cirr_metrics(scores, targets, references, subset)
    # q0 without its reference: 5 (.90), 1 (.80), 3 (.75), 2 (.70) -> rank 3; q1 without reference: 1 (.60, earlier
    # tie), 4 -> rank 1. R@1 = 0, R@5 = 100.
    assert metrics["R@1"] == 0.0 and metrics["R@5"] == 100.0 and metrics["R@10"] == 100.0
    # subsets without the reference: q0 {1, 3, 2}: 1, 3, 2 -> rank 2; q1 {4} -> rank 0
    assert metrics["Rs@1"] == 50.0 and metrics["Rs@2"] == 50.0 and metrics["Rs@3"] == 100.0
    assert metrics["Avg"] == 75.0


def test_cirr_metrics_fall_if_the_reference_were_kept():
    """Both references outscore their targets: keeping them would push every target one further down."""
    scores, targets, references, subset = toy_cirr()
    kept = target_ranks(scores, targets)
    assert kept.tolist() == [4, 2]  # q0: 0, 5, 1, 3 ahead of target 2; q1: 5, 1 ahead of target 4


def test_fashioniq_metrics_average_categories():
    metrics = fashioniq_metrics({"dress": torch.tensor([0, 20, 60]), "shirt": torch.tensor([5, 9])})
    assert metrics["dress/R@10"] == pytest.approx(100 / 3) and metrics["dress/R@50"] == pytest.approx(200 / 3)
    assert metrics["shirt/R@10"] == 100.0 and metrics["shirt/R@50"] == 100.0
    assert metrics["R@10"] == pytest.approx((100 / 3 + 100) / 2)
    assert metrics["Avg"] == pytest.approx((metrics["R@10"] + metrics["R@50"]) / 2)


# -- metrics on subsets of the queries (eval/query_subsets.py) ----------------------------------------


def placed(reference: int, target: int, rank: int, size: int) -> torch.Tensor:
    """Scores [size]: the reference best, then the others in gallery order with the target at 0-based ``rank``
    among them (the rank CIRR's protocol gives it, reference removed)."""
    others = [i for i in range(size) if i not in (reference, target)]
    order = [reference] + others[:rank] + [target] + others[rank:]
    scores = torch.empty(size)
    scores[order] = torch.arange(size, 0, -1, dtype=torch.float)
    return scores


def test_unimodal_hard_queries_known_by_construction():
    """4 CIRR queries over 14 images, each reference outscoring everything (the protocol removes it). Target ranks
    (image_only, text_only): q0 (9, 11) solved by the image (rank 10 if the reference were kept: unsolved);
    q1 (10, 10) hard: rank 10 is the 11th place; q2 (10, 0) solved by the text; q3 (11, 10) hard."""
    import pyarrow as pa

    from detailfusion.library.eval.protocols import CirrQueries, SplitRanks
    from detailfusion.library.eval.query_subsets import unimodal_hard
    from detailfusion.library.index.exact import GalleryIndex

    size, references, targets = 14, [0, 1, 2, 3], [13, 12, 11, 10]
    ids = [f"g{i}" for i in range(size)]
    first_others = [[ids[i] for i in range(size) if i not in (r, t)][:2] for r, t in zip(references, targets)]
    members = [[ids[r], ids[t], *others] for r, t, others in zip(references, targets, first_others)]
    triplets = pa.table({"sample_id": [f"cirr/val/{q}" for q in range(4)],
                         "reference_id": [ids[r] for r in references], "target_id": [ids[t] for t in targets],
                         "subset_ids": members})
    cirr = CirrQueries(triplets, GalleryIndex(torch.randn(size, 1, 4), ids, "x"))
    placements = {"image_only": [9, 10, 10, 11], "text_only": [11, 10, 0, 10], "di": [12, 0, 12, 3]}
    ranks = SplitRanks({}, {})
    for variant, at in placements.items():
        scores = torch.stack([placed(r, t, k, size) for r, t, k in zip(references, targets, at)])
        ranks.gallery[variant], ranks.subset[variant] = cirr.ranks(scores)
    assert ranks.gallery["image_only"].tolist() == [9, 10, 10, 11]
    hard = unimodal_hard(ranks, list(placements))
    assert hard["queries"] == 2 and hard["k"] == 10 and "top 10 of neither image_only" in hard["definition"]
    assert hard["solved_by"] == {"image_only": 1, "text_only": 1, "either": 2}
    assert hard["variants"]["image_only"]["R@10"] == 0.0 and hard["variants"]["text_only"]["R@10"] == 0.0
    # di on q1 (rank 0, subset rank 0) and q3 (rank 3; g0 and g1, its subset's others, ahead: subset rank 2)
    assert hard["variants"]["di"] == {"R@1": 50.0, "R@5": 100.0, "R@10": 100.0, "R@50": 100.0, "Rs@1": 50.0,
                                      "Rs@2": 50.0, "Rs@3": 100.0, "Avg": 75.0}
    assert ranks.metrics("di")["R@10"] == 50.0  # over all 4 queries: q0 and q2 at rank 12
    assert unimodal_hard(ranks, ["di"], k=12)["queries"] == 0  # every target within the top 12 of one of them
    with pytest.raises(ValueError, match="text_only"):
        unimodal_hard(SplitRanks({"image_only": ranks.gallery["image_only"]}, {}), ["image_only"])


def test_unimodal_hard_on_fashioniq_keeps_the_per_category_protocol():
    """FashionIQ ranks within category galleries; the hard queries' metrics average the categories they hold."""
    from detailfusion.library.eval.protocols import SplitRanks
    from detailfusion.library.eval.query_subsets import unimodal_hard

    ranks = SplitRanks({"image_only": torch.tensor([0, 12, 15, 30]), "text_only": torch.tensor([11, 10, 3, 40]),
                        "gm": torch.tensor([0, 4, 0, 20])}, categories=["dress", "dress", "shirt", "toptee"])
    hard = unimodal_hard(ranks, ["gm"])
    assert hard["queries"] == 2  # q1 (dress) and q3 (toptee)
    assert hard["variants"]["gm"] == {"dress/R@10": 100.0, "dress/R@50": 100.0, "toptee/R@10": 0.0,
                                      "toptee/R@50": 100.0, "R@10": 50.0, "R@50": 100.0, "Avg": 75.0}


def test_metrics_by_tag_partition_the_tagged_queries():
    """CIRR metrics are means over queries: each tag's metrics, weighted by its count, give back the metrics of
    the tagged queries; untagged queries are left out."""
    from detailfusion.library.eval.protocols import SplitRanks
    from detailfusion.library.eval.query_subsets import by_tag

    generator = torch.Generator().manual_seed(0)
    ranks = SplitRanks({v: torch.randint(0, 20, (40,), generator=generator) for v in ("gm", "di")},
                       {v: torch.randint(0, 5, (40,), generator=generator) for v in ("gm", "di")})
    labels = [("local", "global", None)[q % 3] for q in range(40)]
    metrics, counts = by_tag(ranks, ["gm", "di"], labels)
    assert list(metrics) == ["global", "local"] and counts == {"global": 13, "local": 14}
    assert set(metrics["local"]) == {"gm", "di"}
    tagged = ranks.metrics("di", torch.tensor([q for q in range(40) if labels[q]]))
    for name, value in tagged.items():
        weighted = sum(counts[label] * metrics[label]["di"][name] for label in counts) / sum(counts.values())
        assert weighted == pytest.approx(value), name
    local = [q for q in range(40) if labels[q] == "local"]
    assert metrics["local"]["gm"]["R@5"] == pytest.approx(100 * float((ranks.gallery["gm"][local] < 5).double().mean()))


# -- submissions ------------------------------------------------------------------------------------


def annotations():
    names = [f"img{i}" for i in range(60)]
    return [
        {"pairid": 7, "reference": "img0", "target_hard": "img2", "img_set": {"members": names[:6]}},
        {"pairid": 8, "reference": "img10", "target_hard": "img55", "img_set": {"members": names[10:16]}},
    ], names


def test_score_cirr_hand_computed():
    records, names = annotations()
    recall = submission("recall", {"7": ["img2"] + names[3:52], "8": names[11:60] + ["img1"]})
    # pairid 8: img55 is at position 44 of names[11:60] -> inside top-50 but not top-10
    subset = submission("recall_subset", {"7": ["img1", "img2", "img3"], "8": ["img11", "img12", "img13"]})
    metrics = score_cirr(records, recall, subset)
    assert metrics["R@1"] == 50.0 and metrics["R@10"] == 50.0 and metrics["R@50"] == 100.0
    assert metrics["Rs@1"] == 0.0 and metrics["Rs@2"] == 50.0 and metrics["Rs@3"] == 50.0
    assert metrics["Avg"] == (metrics["R@5"] + metrics["Rs@1"]) / 2


def test_malformed_submissions_list_every_problem():
    records, names = annotations()
    bad = {"version": "rc1", "metric": "recall", "7": ["img0"] + names[1:49], "9": names[:50]}
    with pytest.raises(SubmissionError) as info:
        check_submission(bad, "recall", records)
    text = str(info.value)
    for expected in ("'rc1'", "pairid(s) missing: 8", "not in the annotations: 9", "49 names, expected 50",
                     "own reference image img0"):
        assert expected in text
    subset = {"version": "rc2", "metric": "recall_subset", "7": ["img1", "img1", "img40"], "8": ["img11", "img12"]}
    with pytest.raises(SubmissionError) as info:
        check_submission(subset, "recall_subset", records)
    text = str(info.value)
    for expected in ("repeated image names", "outside its img_set.members: img40", "2 names, expected 3"):
        assert expected in text


def test_load_submission_refuses_duplicate_pairids_and_bad_json(tmp_path):
    path = tmp_path / "s.json"
    path.write_text('{"version": "rc2", "metric": "recall", "7": [], "7": []}')
    with pytest.raises(SubmissionError, match="'7' appears more than once"):
        load_submission(path)
    path.write_text('{"version": "rc2",')
    with pytest.raises(SubmissionError, match="not valid JSON"):
        load_submission(path)
    path.write_text(json.dumps([1, 2]))
    with pytest.raises(SubmissionError, match="expected a JSON object"):
        load_submission(path)
    with pytest.raises(FileNotFoundError):
        load_submission(tmp_path / "absent.json")
