"""What each of METHOD.md's stages trains, freezes, reads, optimises and is validated on. The stages are data
(``StageSpec``), not classes or branches on a stage number: one training recipe (``loop.py``) runs them all; each
objective's forward is here (``branch_loss``; stage 3: ``branch_outputs`` once, then ``fused_loss``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from detailfusion.library.config import LossConfig
from detailfusion.library.losses import (
    ContrastiveLoss,
    DetailLoss,
    FusedContrastiveLoss,
    ImageTextContrastiveLoss,
    JointLoss,
)


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
        """Whether the loss can use a split's near-duplicate (img_set) negatives: L_DI's (stages 1-2) and L_C's
        (stage 3, as gallery embeddings)."""
        return self.objective in ("detail", "joint", "fused")


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
    """The stage's loss; ``fusion_score``: the model's rule, which stage 3's ``L_C`` scores with. The hard-negative
    switches (``reference_negative``, ``hard_negative_scale``, ``batch_reference_negatives``) shape L_DI at stages
    1-2 and L_C at stage 3; the subset negatives come with the batch (``loss.subset_negatives`` per row)."""
    rank = {"gather": config.gather_across_ranks}
    hard = (config.reference_negative, config.hard_negative_scale, config.batch_reference_negatives)
    if spec.objective == "image_text":
        return ImageTextContrastiveLoss(**rank)
    if spec.objective == "fused":
        return FusedContrastiveLoss(fusion_score, *hard, **rank)
    detail = DetailLoss(*hard, **rank)
    return detail if spec.objective == "detail" else JointLoss(detail, ContrastiveLoss(**rank), gamma=config.gamma)


def branch_loss(spec: StageSpec, model, loss_fn, batch: dict[str, torch.Tensor], images: str) -> dict[str, torch.Tensor]:
    """The image_text, detail and joint objectives: encode the batch and apply the stage's loss. ``images``:
    "pixel_values" | "embeds". The DI branch encodes the reference only when its loss uses it, and the subset
    negatives whenever the batch has them (``loss.subset_negatives`` > 0)."""
    if spec.objective == "image_text":
        return image_text_loss(model, loss_fn, batch, images)
    detail = loss_fn if spec.objective == "detail" else loss_fn.detail
    out = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        branches=spec.branches,
        with_reference_targets=detail.uses_references,
        **{f"reference_{images}": batch["reference"], f"target_{images}": batch["target"]},
    )
    di = dict(query=out.query_di, targets=out.target_di, temperature=model.di_branch.temperature(),
              references=out.reference_di)
    if "subset" in batch:  # [B, K, ...] near-duplicates -> DI target features [B, K, Nq, D]
        di["subset_negatives"] = model.di_branch.encode_target(_flat_embeds(model, batch["subset"], images)).unflatten(
            0, batch["subset"].shape[:2])
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


def _flat_embeds(model, images: torch.Tensor, kind: str) -> torch.Tensor:
    """[B, K, ...] images (pixels or cached ViT tokens, ``kind``) -> ViT tokens [B * K, T, W]."""
    flat = images.flatten(0, 1)
    return model.encode_image(flat) if kind == "pixel_values" else flat


@torch.no_grad()
def branch_outputs(model, batch: dict[str, torch.Tensor], images: str, references: bool) -> dict[str, torch.Tensor]:
    """Stage 3's cached row of one batch: the frozen branches' outputs, computed once. q_* [B, D], h_* [B, Nq + L, H]
    and m_* [B, Nq + L] of each branch's composed query (the compositor's input); ``gallery`` [B, Nq, 2D] the
    target's gallery embedding; with ``references``, ``reference_gallery`` [B, Nq, 2D] the query's own reference
    through both target paths (L_C's reference negative); with a ``subset`` batch column [B, K, ...],
    ``subset_gallery`` [B, K, Nq, 2D] its img_set members' (L_C's subset negatives)."""
    ref = batch["reference"] if images == "embeds" else model.encode_image(batch["reference"])
    tgt = batch["target"] if images == "embeds" else model.encode_image(batch["target"])
    queries = model.encode_queries(ref, batch["input_ids"], batch["attention_mask"])
    row = {}
    for name, query in queries.items():
        row[f"q_{name}"], row[f"h_{name}"], row[f"m_{name}"] = query.feature, query.hidden_states, query.attention_mask
    row["gallery"] = _gallery(model, tgt)
    if references:
        row["reference_gallery"] = _gallery(model, ref)
    if "subset" in batch:
        row["subset_gallery"] = _gallery(model, _flat_embeds(model, batch["subset"], images)).unflatten(
            0, batch["subset"].shape[:2])
    return row


def _gallery(model, embeds: torch.Tensor) -> torch.Tensor:
    """ViT tokens [N, T, W] -> gallery embeddings [N, Nq, 2D] (both branches' target paths)."""
    targets = model.encode_targets(embeds)
    return model.gallery_embedding(targets["gm"], targets["di"])


def fused_loss(model, loss_fn, row: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The fused objective (stage 3) on cached rows (``branch_outputs``): compose, then L_C with the row's reference
    and subset gallery embeddings where present."""
    from detailfusion.library.model import BranchQueryOutput

    gm = BranchQueryOutput(row["q_gm"], row["h_gm"], row["m_gm"])
    di = BranchQueryOutput(row["q_di"], row["h_di"], row["m_di"])
    unified = model.compose(gm, di).query
    return loss_fn(unified, row["gallery"], model.unified_temperature(), references=row.get("reference_gallery"),
                   subset_negatives=row.get("subset_gallery"))
