"""The catalogue benchmark's recall as users judge it (issue 36): ann-benchmarks' tolerance-aware recall and task
recall, on hand-made lists whose answers are known."""

import importlib.util
from pathlib import Path

import torch

SPEC = importlib.util.spec_from_file_location("catalogue", Path(__file__).parents[1] / "benchmarks" / "catalogue.py")
catalogue = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(catalogue)


def test_tolerance_counts_swaps_of_equal_images_and_nothing_worse():
    # exact list of one query: images 0..5 with scores; ranks 2 and 3 (images 2, 3) are within 1e-3 of each other
    exact = torch.tensor([[0, 1, 2, 3, 4, 5]])
    scores = torch.tensor([[0.90, 0.80, 0.70, 0.6997, 0.50, 0.40]])
    swapped = torch.tensor([[0, 1, 3]])  # image 3 instead of 2: distance 0.3003 <= 1.001 * 0.3
    worse = torch.tensor([[0, 1, 4]])  # image 4: distance 0.5, not within tolerance
    assert catalogue.recall(swapped, exact[:, :3]) == 2 / 3  # the exact-list recall calls the swap an error
    assert catalogue.tolerance_recall(swapped, exact, scores, 3) == (1.0, 0)
    assert catalogue.tolerance_recall(worse, exact, scores, 3) == (2 / 3, 0)
    # an exact list too short to hold every qualifying image is reported as such
    assert catalogue.tolerance_recall(swapped, exact[:, :4], scores[:, :4], 3)[1] == 1


def test_task_recall_finds_the_planted_target():
    found = torch.tensor([[5, 7, 9], [1, 2, 3]])
    targets = torch.tensor([9, 4])
    assert catalogue.task_recall(found, targets, 3) == 0.5
    assert catalogue.task_recall(found, targets, 2) == 0.0
