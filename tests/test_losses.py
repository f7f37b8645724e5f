"""Losses against hand-computed logits, the paper's ablation identity, and the gather across 2 ranks."""

import math
import os

import pytest
import torch
import torch.multiprocessing as mp

from detailfusion.losses import ContrastiveLoss, DetailLoss, JointLoss, gather_features, max_similarity

ONE = torch.tensor(1.0)


def ce(logits, label):
    """Cross-entropy by hand: log(sum exp) - logit[label]."""
    return math.log(sum(math.exp(x) for x in logits)) - logits[label]


def features():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    t = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])  # [B=2, Nq=1, D=2]
    r = torch.tensor([[[0.6, 0.8]], [[0.8, 0.6]]])
    return q, t, r


def test_max_similarity_takes_the_best_token():
    q = torch.tensor([[0.0, 1.0]])
    t = torch.tensor([[[1.0, 0.0], [0.6, 0.8]], [[0.0, -1.0], [0.0, 0.5]]])
    assert torch.allclose(max_similarity(q, t), torch.tensor([[0.8, 0.5]]))


def test_contrastive_loss_matches_hand_computation():
    q, t, _ = features()
    expected = (ce([1, 0], 0) + ce([0, 1], 1)) / 2
    assert ContrastiveLoss()(q, t, ONE)["loss"].item() == pytest.approx(expected, abs=1e-6)
    # temperature divides the logits
    expected_tau = (ce([10, 0], 0) + ce([0, 10], 1)) / 2
    assert ContrastiveLoss()(q, t, torch.tensor(0.1))["loss"].item() == pytest.approx(expected_tau, abs=1e-5)


def test_detail_loss_adds_the_own_reference_as_hard_negative():
    q, t, r = features()
    expected = (ce([1, 0, 0.6], 0) + ce([0, 1, 0.6], 1)) / 2
    assert DetailLoss()(q, t, ONE, references=r)["loss"].item() == pytest.approx(expected, abs=1e-6)
    scaled = (ce([1, 0, 0.6 + math.log(3)], 0) + ce([0, 1, 0.6 + math.log(3)], 1)) / 2
    loss = DetailLoss(hard_negative_scale=3.0)(q, t, ONE, references=r)["loss"].item()
    assert loss == pytest.approx(scaled, abs=1e-6) and loss > expected


def test_detail_loss_with_batch_references_and_subset_negatives():
    q, t, r = features()
    w = math.log(2)
    subset = torch.tensor([[[[0.8, 0.6]]], [[[0.28, 0.96]]]])  # [B, S=1, Nq=1, D]
    expected = (ce([1, 0, 0.6 + w, 0.8, 0.8 + w], 0) + ce([0, 1, 0.8, 0.6 + w, 0.96 + w], 1)) / 2
    loss = DetailLoss(hard_negative_scale=2.0, batch_reference_negatives=True)(
        q, t, ONE, references=r, subset_negatives=subset
    )["loss"]
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_detail_loss_without_reference_negative_equals_the_matching_loss():
    torch.manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(8, 16), dim=-1)
    t = torch.nn.functional.normalize(torch.randn(8, 4, 16), dim=-1)
    r = torch.nn.functional.normalize(torch.randn(8, 4, 16), dim=-1)
    tau = torch.tensor(0.07)
    off = DetailLoss(reference_negative=False, hard_negative_scale=5.0)(q, t, tau, references=r)["loss"]
    assert torch.equal(off, ContrastiveLoss()(q, t, tau)["loss"])
    assert not torch.allclose(DetailLoss()(q, t, tau, references=r)["loss"], off)
    with pytest.raises(ValueError, match="needs the references"):
        DetailLoss()(q, t, tau)
    with pytest.raises(ValueError, match=">= 1"):
        DetailLoss(hard_negative_scale=0.5)


def test_joint_loss_weights_the_matching_term_by_gamma():
    q, t, r = features()
    parts = JointLoss(DetailLoss(), ContrastiveLoss(), gamma=2.0)(
        gm=dict(query=q, targets=t, temperature=ONE), di=dict(query=q, targets=t, temperature=ONE, references=r)
    )
    assert parts["loss_di"].item() == pytest.approx((ce([1, 0, 0.6], 0) + ce([0, 1, 0.6], 1)) / 2, abs=1e-6)
    assert parts["loss_gm"].item() == pytest.approx(ce([1, 0], 0), abs=1e-6)
    assert parts["loss"].item() == pytest.approx(parts["loss_di"].item() + 2 * parts["loss_gm"].item(), abs=1e-6)


def test_gather_is_identity_on_one_process():
    x = torch.randn(3, 2)
    assert gather_features(x, rank=0, world_size=1) is x


def _global_batch(seed=0, batch=4):
    g = torch.Generator().manual_seed(seed)
    norm = torch.nn.functional.normalize
    return (norm(torch.randn(batch, 8, generator=g), dim=-1), norm(torch.randn(batch, 3, 8, generator=g), dim=-1),
            norm(torch.randn(batch, 3, 8, generator=g), dim=-1))


def _rank_worker(rank, world_size, init_file, results, gather):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    q, t, r = _global_batch()
    shard = slice(rank * 2, rank * 2 + 2)
    q, t, r = (x[shard].clone().requires_grad_(True) for x in (q, t, r))
    loss = DetailLoss(batch_reference_negatives=True, gather=gather)(q, t, torch.tensor(0.5), references=r)["loss"]
    loss.backward()
    results[rank] = (loss.item(), q.grad.clone(), t.grad.clone(), r.grad.clone())
    torch.distributed.destroy_process_group()


@pytest.mark.parametrize("gather", [True, False])
def test_two_ranks_see_the_global_batch_only_with_the_gather(tmp_path, gather):
    q, t, r = (x.clone().requires_grad_(True) for x in _global_batch())
    full = DetailLoss(batch_reference_negatives=True)(q, t, torch.tensor(0.5), references=r)["loss"]
    full.backward()
    results = mp.Manager().dict()
    mp.spawn(_rank_worker, args=(2, str(tmp_path / "init"), results, gather), nprocs=2, join=True)
    mean_loss = (results[0][0] + results[1][0]) / 2
    # each rank's gradient on its shard is world_size x the global-batch gradient (ranks then average)
    grads = [torch.cat([results[0][i], results[1][i]]) / 2 for i in (1, 2, 3)]
    same = math.isclose(mean_loss, full.item(), abs_tol=1e-6) and all(
        torch.allclose(g, x.grad, atol=1e-6) for g, x in zip(grads, (q, t, r))
    )
    assert same == gather
