"""What each of METHOD.md's stages trains, freezes, reads, optimises and is validated on. The stages are data
(``StageSpec``), not classes or branches on a stage number: one training recipe (``loop.py``) runs them all; what a
stage optimises is a registered objective (``library/objectives.py``), named here and swappable by
``train.objective``."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import torch

from detailfusion.library.config import LossConfig, TrainConfig
from detailfusion.library.errors import ConfigError
from detailfusion.library.model.fusion import DEFAULT_FUSION_RULE
from detailfusion.library.objectives import OBJECTIVES, Objective


@dataclass(frozen=True)
class StageSpec:
    """One stage as data: everything the recipe, the driver's checks and validation ask of a stage is a field here
    (no code branches on the stage's number)."""

    number: int
    name: str
    trainable: tuple[str, ...]  # attributes of DetailFusionModel that receive gradients
    layout: Literal["inline", "gallery"]  # the layout of the datasets it trains on (library/datasets.py): image
    #   pairs with text (IPr2Pr) or annotated queries over a gallery (CIRR, FashionIQ)
    objective: str  # a registered objective (library/objectives.py): the loss, its forward and the batches it reads
    starts_from: Literal["preset", "previous_export", "previous_export_new_compositor"]  # preset: a preset's weights
    #   unless model.init_from names an export; the others need model.init_from (the previous stage's export)
    trains_on: Literal["fit", "holdout"]  # which part of a split with data.holdout_fraction > 0
    validation_variant: str | None  # the eval variant that scores the stage; None: the model's compositor
    validates_fixed_weights: bool  # also validate the fixed-weight blends (FIXED_WEIGHTS) of the two branches
    export_gm_into_di: bool = False  # at export, DI starts from the trained GM Q-Former (as both start from BLIP-2's)

    @property
    def loss(self) -> Objective:
        return OBJECTIVES.get(self.objective, f"stage {self.number}'s objective")

    @property
    def batches(self) -> str:
        """What the objective reads: "captions" | "triplets" | "branch_outputs" (computed once, re-dealt each epoch)."""
        return self.loss.batches

    @property
    def near_duplicates(self) -> bool:
        """Whether the loss can use a split's near-duplicate (img_set) negatives: L_DI's (stages 1-2) and L_C's
        (stage 3, as gallery embeddings)."""
        return self.loss.near_duplicates


STAGES = {
    0: StageSpec(0, "Q-Former image-text pre-training (ITC)", ("gm_branch",), "inline",
                 objective="image_text", starts_from="preset", trains_on="fit",
                 validation_variant="gm", validates_fixed_weights=True, export_gm_into_di=True),
    1: StageSpec(1, "detail pre-training (DI, L_DI)", ("di_branch",), "inline",
                 objective="detail", starts_from="preset", trains_on="fit",
                 validation_variant="di", validates_fixed_weights=False),
    2: StageSpec(2, "joint fine-tuning (L_DI + gamma L_GM)", ("gm_branch", "di_branch"), "gallery",
                 objective="joint", starts_from="previous_export", trains_on="fit",
                 validation_variant="static", validates_fixed_weights=True),
    3: StageSpec(3, "compositor (L_C, branches frozen)", ("compositor", "unified_temp"), "gallery",
                 objective="fused",
                 starts_from="previous_export_new_compositor", trains_on="holdout", validation_variant=None,
                 validates_fixed_weights=True),
}


def freeze_for_stage(model, spec: StageSpec) -> None:
    """Only the stage's parts keep gradients; everything else (always the ViT) is frozen."""
    model.requires_grad_(False)
    for name in spec.trainable:
        getattr(model, name).requires_grad_(True)


def stage_spec(train: TrainConfig) -> StageSpec:
    """The stage ``train.stage`` with ``train.objective`` (when set) as its objective; the swapped-in objective must
    read the stage's kind of batches."""
    spec = STAGES[train.stage]
    if train.objective is None or train.objective == spec.objective:
        return spec
    swapped = replace(spec, objective=OBJECTIVES.check(train.objective, "train.objective"))
    if swapped.batches != spec.batches:
        raise ConfigError(f"train.objective={train.objective!r} reads {swapped.batches} batches; stage {spec.number} "
                          f"({spec.name}) feeds {spec.batches}")
    return swapped


def build_loss(spec: StageSpec, config: LossConfig, fusion_score: str = DEFAULT_FUSION_RULE):
    """The stage's loss module; ``fusion_score``: the model's rule (stage 3's L_C scores with it)."""
    return spec.loss.build(config, fusion_score)


def stage_loss(spec: StageSpec, model, loss_fn, batch: dict[str, torch.Tensor], images: str) -> dict[str, torch.Tensor]:
    """One forward of the stage's objective on a batch: {"loss": scalar, ...parts}."""
    return spec.loss.forward(model, loss_fn, batch, images)
