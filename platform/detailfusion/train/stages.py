"""What each of METHOD.md's three stages trains, freezes, reads and optimises. The stages are data, not classes:
one training recipe (``loop.py``) runs them all."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import LossConfig
from ..losses import ContrastiveLoss, DetailLoss, FusedContrastiveLoss, ImageTextContrastiveLoss, JointLoss


@dataclass(frozen=True)
class StageSpec:
    number: int
    name: str
    trainable: tuple[str, ...]  # attributes of DetailFusionModel that receive gradients
    datasets: tuple[str, ...]  # prepared datasets the stage may train on
    branches: tuple[str, ...]  # branches run in the forward pass


STAGES = {
    0: StageSpec(0, "Q-Former image-text pre-training (ITC)", ("gm_branch",), ("ipr2pr",), ("gm",)),
    1: StageSpec(1, "detail pre-training (DI, L_DI)", ("di_branch",), ("ipr2pr",), ("di",)),
    2: StageSpec(2, "joint fine-tuning (L_DI + gamma L_GM)", ("gm_branch", "di_branch"), ("cirr", "fashioniq"),
                 ("gm", "di")),
    3: StageSpec(3, "compositor (L_C, branches frozen)", ("compositor", "unified_temp"), ("cirr", "fashioniq"),
                 ("gm", "di")),
}


def freeze_for_stage(model, spec: StageSpec) -> None:
    """Only the stage's parts keep gradients; everything else (always the ViT) is frozen."""
    model.requires_grad_(False)
    for name in spec.trainable:
        getattr(model, name).requires_grad_(True)


def build_loss(spec: StageSpec, config: LossConfig, fusion_score: str = "branch_max"):
    """The stage's loss; ``fusion_score``: the model's rule, which stage 3's ``L_C`` scores with."""
    rank = {"gather": config.gather_across_ranks}
    if spec.number == 0:
        return ImageTextContrastiveLoss(**rank)
    detail = DetailLoss(config.reference_negative, config.hard_negative_scale, config.batch_reference_negatives, **rank)
    if spec.number == 1:
        return detail
    if spec.number == 2:
        return JointLoss(detail, ContrastiveLoss(**rank), gamma=config.gamma)
    return FusedContrastiveLoss(fusion_score, **rank)


def branch_loss(spec: StageSpec, model, loss_fn, batch: dict[str, torch.Tensor], images: str) -> dict[str, torch.Tensor]:
    """Stages 0, 1 and 2: encode the batch and apply the stage's loss. ``images``: "pixel_values" | "embeds".
    The DI branch encodes the hard negatives (reference, subset) only when its loss uses them."""
    if spec.number == 0:
        return image_text_loss(model, loss_fn, batch, images)
    hard_negatives = (loss_fn if spec.number == 1 else loss_fn.detail).reference_negative
    out = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        branches=spec.branches,
        with_reference_targets=hard_negatives,
        **{f"reference_{images}": batch["reference"], f"target_{images}": batch["target"]},
    )
    di = dict(query=out.query_di, targets=out.target_di, temperature=model.di_branch.temperature(),
              references=out.reference_di)
    if "subset" in batch and hard_negatives:  # [B, K, ...] near-duplicates -> DI target features [B, K, Nq, D]
        subset = batch["subset"].flatten(0, 1)
        embeds = model.encode_image(subset) if images == "pixel_values" else subset
        di["subset_negatives"] = model.di_branch.encode_target(embeds).unflatten(0, batch["subset"].shape[:2])
    if spec.number == 1:
        return loss_fn(**di)
    gm = dict(query=out.query_gm, targets=out.target_gm, temperature=model.gm_branch.temperature())
    return loss_fn(gm=gm, di=di)


def image_text_loss(model, loss_fn, batch: dict[str, torch.Tensor], images: str) -> dict[str, torch.Tensor]:
    """Stage 0: both images of each row with their captions (input_ids: the reference's, target_input_ids: the
    target's) as 2B image-text pairs through the GM Q-Former (copied into DI at export, as BLIP-2 starts both)."""
    pictures = torch.cat([batch["reference"], batch["target"]])
    embeds = model.encode_image(pictures) if images == "pixel_values" else pictures
    ids = torch.cat([batch["input_ids"], batch["target_input_ids"]])
    mask = torch.cat([batch["attention_mask"], batch["target_attention_mask"]])
    branch = model.gm_branch
    return loss_fn(branch.encode_text(ids, mask), branch.encode_target(embeds), branch.temperature())
