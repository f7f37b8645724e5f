"""What each of METHOD.md's stages trains, freezes, reads, optimises and is validated on. The stages are data
(``StageSpec``), not classes or branches on a stage number: one training recipe (``loop.py``) runs them all."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from ..config import LossConfig
from ..losses import ContrastiveLoss, DetailLoss, FusedContrastiveLoss, ImageTextContrastiveLoss, JointLoss


@dataclass(frozen=True)
class StageSpec:
    """One stage as data: everything the recipe, the driver's checks and validation ask of a stage is a field here
    (no code branches on the stage's number)."""

    number: int
    name: str
    trainable: tuple[str, ...]  # attributes of DetailFusionModel that receive gradients
    datasets: tuple[str, ...]  # prepared datasets the stage may train on
    branches: tuple[str, ...]  # branches run in the forward pass
    objective: Literal["image_text", "detail", "joint", "fused"]  # the loss (build_loss) and its inputs (stage_loss)
    batches: Literal["captions", "triplets", "branch_outputs"]  # image-caption rows; query triplets; the frozen
    #   branches' outputs over the split, computed once at the start and re-dealt every epoch
    starts_from: Literal["preset", "previous_export", "previous_export_new_compositor"]  # preset: a preset's weights
    #   unless model.init_from names an export; the others need model.init_from (the previous stage's export)
    trains_on: Literal["fit", "holdout"]  # which part of a split with data.holdout_fraction > 0
    validation_variant: str | None  # the eval variant that scores the stage; None: the model's compositor
    validates_fixed_weights: bool  # also validate the fixed-weight blends (FIXED_WEIGHTS) of the two branches
    export_gm_into_di: bool = False  # at export, DI starts from the trained GM Q-Former (as both start from BLIP-2's)

    @property
    def near_duplicates(self) -> bool:
        """Whether the loss can use a split's near-duplicate negatives (the DI branch's hard negatives)."""
        return self.objective in ("detail", "joint")


STAGES = {
    0: StageSpec(0, "Q-Former image-text pre-training (ITC)", ("gm_branch",), ("ipr2pr",), ("gm",),
                 objective="image_text", batches="captions", starts_from="preset", trains_on="fit",
                 validation_variant="gm", validates_fixed_weights=True, export_gm_into_di=True),
    1: StageSpec(1, "detail pre-training (DI, L_DI)", ("di_branch",), ("ipr2pr",), ("di",),
                 objective="detail", batches="triplets", starts_from="preset", trains_on="fit",
                 validation_variant="di", validates_fixed_weights=False),
    2: StageSpec(2, "joint fine-tuning (L_DI + gamma L_GM)", ("gm_branch", "di_branch"), ("cirr", "fashioniq"),
                 ("gm", "di"), objective="joint", batches="triplets", starts_from="previous_export", trains_on="fit",
                 validation_variant="static", validates_fixed_weights=True),
    3: StageSpec(3, "compositor (L_C, branches frozen)", ("compositor", "unified_temp"), ("cirr", "fashioniq"),
                 ("gm", "di"), objective="fused", batches="branch_outputs",
                 starts_from="previous_export_new_compositor", trains_on="holdout", validation_variant=None,
                 validates_fixed_weights=True),
}


def freeze_for_stage(model, spec: StageSpec) -> None:
    """Only the stage's parts keep gradients; everything else (always the ViT) is frozen."""
    model.requires_grad_(False)
    for name in spec.trainable:
        getattr(model, name).requires_grad_(True)


def build_loss(spec: StageSpec, config: LossConfig, fusion_score: str = "branch_max"):
    """The stage's loss; ``fusion_score``: the model's rule, which stage 3's ``L_C`` scores with."""
    rank = {"gather": config.gather_across_ranks}
    if spec.objective == "image_text":
        return ImageTextContrastiveLoss(**rank)
    if spec.objective == "fused":
        return FusedContrastiveLoss(fusion_score, **rank)
    detail = DetailLoss(config.reference_negative, config.hard_negative_scale, config.batch_reference_negatives, **rank)
    return detail if spec.objective == "detail" else JointLoss(detail, ContrastiveLoss(**rank), gamma=config.gamma)


def branch_loss(spec: StageSpec, model, loss_fn, batch: dict[str, torch.Tensor], images: str) -> dict[str, torch.Tensor]:
    """The image_text, detail and joint objectives: encode the batch and apply the stage's loss. ``images``:
    "pixel_values" | "embeds". The DI branch encodes the hard negatives (reference, subset) only when its loss uses
    them."""
    if spec.objective == "image_text":
        return image_text_loss(model, loss_fn, batch, images)
    hard_negatives = (loss_fn if spec.objective == "detail" else loss_fn.detail).reference_negative
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
    if spec.objective == "detail":
        return loss_fn(**di)
    gm = dict(query=out.query_gm, targets=out.target_gm, temperature=model.gm_branch.temperature())
    return loss_fn(gm=gm, di=di)


def image_text_loss(model, loss_fn, batch: dict[str, torch.Tensor], images: str) -> dict[str, torch.Tensor]:
    """The image_text objective (stage 0): both images of each row with their captions (input_ids: the reference's, target_input_ids: the
    target's) as 2B image-text pairs through the GM Q-Former (copied into DI at export, as BLIP-2 starts both)."""
    pictures = torch.cat([batch["reference"], batch["target"]])
    embeds = model.encode_image(pictures) if images == "pixel_values" else pictures
    ids = torch.cat([batch["input_ids"], batch["target_input_ids"]])
    mask = torch.cat([batch["attention_mask"], batch["target_attention_mask"]])
    branch = model.gm_branch
    return loss_fn(branch.encode_text(ids, mask), branch.encode_target(embeds), branch.temperature())
