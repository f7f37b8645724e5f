"""Stage 3's L_C with the reference and img_set negatives and the gallery bank (METHOD.md stage 3 [ours]): the fused
loss's columns against hand-built gallery embeddings, the loop's bank draws, and the cached rows of the frozen
branches (a real stage-3 run whose loss sees them: tests/test_training.py's all-stages test)."""

import math

import pytest
import torch

from detailfusion.library.config import LossConfig
from detailfusion.library.losses import FusedContrastiveLoss
from detailfusion.library.model import build_model
from detailfusion.library.model.fusion import fused_scores
from detailfusion.library.objectives import branch_outputs, fused_loss
from detailfusion.platform.train.stages import STAGES, build_loss, freeze_for_stage

ONE = torch.tensor(1.0)


def ce(logits, label):
    return math.log(sum(math.exp(x) for x in logits)) - logits[label]


# Unified queries [B=2, 2D=2] (D = 1 per branch) and gallery embeddings [B, Nq=1, 2D]: branch_max scores are plain dot
# products here: s(u_0, t_0) = 1, s(u_0, t_1) = 0.2, s(u_1, t_0) = 0.5, s(u_1, t_1) = 1.
U = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
TARGETS = torch.tensor([[[1.0, 0.5]], [[0.2, 1.0]]])
REFERENCES = torch.tensor([[[0.9, 0.1]], [[0.3, 0.7]]])  # s(u_0, r_0) = 0.9, s(u_1, r_1) = 0.7
SUBSET = torch.tensor([[[[0.6, 0.6]]], [[[0.5, 0.8]]]])  # [B, K=1, Nq, 2D]: s(u_0, .) = 0.6, s(u_1, .) = 0.8


@pytest.mark.parametrize("reference, subset, columns", [
    (False, False, [[1, 0.2], [0.5, 1]]),  # in-batch only (the L_C of before)
    (True, False, [[1, 0.2, 0.9], [0.5, 1, 0.7]]),  # reference on, K = 0: its column alone
    (False, True, [[1, 0.2, 0.6], [0.5, 1, 0.8]]),  # reference off, K = 1: the img_set column alone
    (True, True, [[1, 0.2, 0.9, 0.6], [0.5, 1, 0.7, 0.8]]),
])
def test_fused_loss_adds_the_reference_and_img_set_columns_by_hand(reference, subset, columns):
    loss = FusedContrastiveLoss("branch_max", reference_negative=reference)
    kwargs = dict(references=REFERENCES, subset_negatives=SUBSET if subset else None)
    assert torch.allclose(loss.logits(U, TARGETS, ONE, **kwargs), torch.tensor(columns), atol=1e-6)
    expected = (ce(columns[0], 0) + ce(columns[1], 1)) / 2
    assert loss(U, TARGETS, ONE, **kwargs)["loss"].item() == pytest.approx(expected, abs=1e-6)


def test_the_gallery_bank_adds_shared_columns_with_the_own_target_masked():
    """loss.gallery_negatives: G bank items scored by every query (the fusion rule), a query's own target at -inf."""
    bank = torch.tensor([[[0.3, 0.4]], [[1.0, 0.5]], [[0.1, 0.9]]])  # item 1 is query 0's target (TARGETS[0])
    mask = torch.tensor([[False, True, False], [False, False, False]])
    loss = FusedContrastiveLoss("branch_max")
    columns = [[1, 0.2, 0.3, float("-inf"), 0.1], [0.5, 1, 0.4, 0.5, 0.9]]
    assert torch.allclose(loss.logits(U, TARGETS, ONE, bank=bank, bank_mask=mask), torch.tensor(columns), atol=1e-6)
    finite = [[1, 0.2, 0.3, 0.1], [0.5, 1, 0.4, 0.5, 0.9]]
    parts = loss(U, TARGETS, ONE, bank=bank, bank_mask=mask)
    assert parts["loss"].item() == pytest.approx((ce(finite[0], 0) + ce(finite[1], 1)) / 2, abs=1e-6)
    # no other hard negatives here: the bank's columns are all of them
    assert 0 < parts["bank_mass"] == parts["hard_negative_mass"] < 1 and "bank_mass" not in loss(U, TARGETS, ONE)


def test_dealt_rows_draw_the_bank_from_distinct_targets_and_mask_the_own_one():
    """The loop's stage-3 dealer: each micro-batch's bank holds distinct targets of the cached rows (no repeats),
    the mask marks exactly each row's own target, and the same seed deals the same banks (a resume redraws them)."""
    from detailfusion.platform.train.loop import dealt

    target_row = torch.tensor([5, 7, 5, 9, 7, 11, 13, 9])  # 5 distinct targets over 8 rows
    gallery = target_row.float()[:, None, None].expand(8, 2, 4).clone()  # each row's gallery = its target's id
    rows = {"gallery": gallery, "target_row": target_row, "q": torch.arange(8.0)}
    first = list(dealt(rows, 4, seed=3, bank=3))
    assert len(first) == 2
    for batch in first:
        ids = batch["bank"][:, 0, 0].long()
        assert batch["bank"].shape == (3, 2, 4) and len(set(ids.tolist())) == 3
        assert set(ids.tolist()) <= {5, 7, 9, 11, 13}
        assert torch.equal(batch["bank_mask"], batch["target_row"][:, None] == ids[None, :])
    again = list(dealt(rows, 4, seed=3, bank=3))
    assert all(torch.equal(a["bank"], b["bank"]) and torch.equal(a["q"], b["q"]) for a, b in zip(first, again))
    assert [b["q"].tolist() for b in dealt(rows, 4, seed=3)] == [b["q"].tolist() for b in first]  # bank 0: same order
    assert "bank" not in next(dealt(rows, 4, seed=3))
    assert next(dealt(rows, 4, seed=3, bank=50))["bank"].shape[0] == 5  # at most the distinct targets


@pytest.mark.parametrize("rule", ["branch_max", "joint_max"])
def test_fused_hard_negatives_are_scored_by_the_model_fusion_rule(rule):
    """Each query's own reference and img_set members are scored as the gallery is at evaluation (fused_scores of
    that query against that image), over several tokens, for both rules; hard_negative_scale adds log w to them."""
    torch.manual_seed(0)
    unit = lambda *shape: torch.nn.functional.normalize(torch.randn(*shape), dim=-1)  # noqa: E731
    u, targets, refs, subset = unit(5, 8), unit(5, 3, 8), unit(5, 3, 8), unit(5, 2, 3, 8)
    tau = torch.tensor(0.1)
    logits = FusedContrastiveLoss(rule, reference_negative=True, hard_negative_scale=2.0).logits(
        u, targets, tau, references=refs, subset_negatives=subset)
    for i in range(5):
        own = [fused_scores(u[i:i + 1], refs[i:i + 1], rule)[0, 0]]
        members = list(fused_scores(u[i:i + 1], subset[i], rule)[0])
        expected = torch.cat([fused_scores(u[i:i + 1], targets, rule)[0] / tau,
                              torch.stack(own + members) / tau + math.log(2.0)])
        assert torch.allclose(logits[i], expected, atol=1e-5)


def test_stage3_caches_reference_and_subset_gallery_embeddings_and_l_c_reads_them():
    """branch_outputs (the loop's cache) holds the reference's and the img_set members' gallery embeddings from both
    frozen branches' target paths; fused_loss puts them into L_C, whose gradient reaches the compositor and tau_u."""
    torch.manual_seed(0)
    model, _ = build_model("tiny")
    spec = STAGES[3]
    freeze_for_stage(model, spec)
    size, members = 4, 2
    batch = {"input_ids": torch.randint(5, 500, (size, 6)), "attention_mask": torch.ones(size, 6, dtype=torch.long),
             "reference": torch.randn(size, 3, 64, 64), "target": torch.randn(size, 3, 64, 64),
             "subset": torch.randn(size, members, 3, 64, 64)}
    model.eval()
    row = branch_outputs(model, batch, "pixel_values", references=True)
    nq, width = row["gallery"].shape[1:]
    assert row["reference_gallery"].shape == (size, nq, width)
    assert row["subset_gallery"].shape == (size, members, nq, width)
    with torch.no_grad():
        def gallery(pixels):
            targets = model.encode_targets(model.encode_image(pixels))
            return model.gallery_embedding(targets["gm"], targets["di"])

        assert torch.allclose(row["reference_gallery"], gallery(batch["reference"]), atol=1e-5)
        assert torch.allclose(row["subset_gallery"][:, 1], gallery(batch["subset"][:, 1]), atol=1e-5)
    assert "reference_gallery" not in branch_outputs(model, batch, "pixel_values", references=False)
    model.train()
    parts = fused_loss(model, build_loss(spec, LossConfig(), model.config.fusion_score), row)
    targets_only = {k: v for k, v in row.items() if k not in ("reference_gallery", "subset_gallery")}
    in_batch = fused_loss(model, FusedContrastiveLoss(model.config.fusion_score), targets_only)
    assert parts["loss"] > in_batch["loss"] and 0 < parts["hard_negative_mass"] < 1
    assert "hard_negative_mass" not in in_batch
    parts["loss"].backward()
    assert model.unified_temp.grad.abs().item() > 0
    assert model.compositor.head[-1].weight.grad.abs().sum() > 0  # the zero-initialised head learns


# A stage-3 run on Ray Train with these negatives and the bank: tests/test_training.py (all stages).
