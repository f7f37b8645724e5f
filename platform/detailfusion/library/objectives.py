"""Stage objectives: what a training stage optimises, as registered entries (``OBJECTIVES``). A stage names its
objective (``platform/train/stages.py``); ``train.objective`` swaps in another registered one that reads the same
kind of batches. A new objective is one ``Objective`` (a loss builder, a forward and the batches it reads) and one
registration.

- ``image_text`` (stage 0): ITC over the rows' image-caption pairs through the GM Q-Former.
- ``detail`` (stage 1): L_DI on the DI branch, with the hard negatives of ``LossConfig``.
- ``joint`` (stage 2): L_DI + gamma L_GM on both branches.
- ``fused`` (stage 3): L_C of the compositor's unified query on the frozen branches' cached outputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch

from detailfusion.library.config import LossConfig
from detailfusion.library.losses import (
    ContrastiveLoss,
    DetailLoss,
    FusedContrastiveLoss,
    ImageTextContrastiveLoss,
    JointLoss,
)
from detailfusion.library.model.branch import BranchQueryOutput
from detailfusion.library.registry import Registry

Batches = Literal["captions", "triplets", "branch_outputs"]


@dataclass(frozen=True)
class Objective:
    """build(loss config, the model's fusion rule name) -> the loss module; forward(model, loss_fn, batch, images)
    -> {"loss": scalar, ...logged parts}, ``images`` "pixel_values" | "embeds" (cached ViT tokens).

    batches: the rows it reads: image-caption rows (``captions``), query triplets (``triplets``) or the frozen
        branches' outputs over the split, computed once at the start (``branch_outputs``, see ``branch_outputs``).
    near_duplicates: whether it can use a split's img_set negatives (``loss.subset_negatives``).
    """

    build: Callable[[LossConfig, str], torch.nn.Module]
    forward: Callable[..., dict[str, torch.Tensor]]
    batches: Batches
    near_duplicates: bool


OBJECTIVES: Registry[Objective] = Registry("stage objective", __name__)


def _hard(config: LossConfig) -> tuple:
    return config.reference_negative, config.hard_negative_scale, config.batch_reference_negatives


def _gather(config: LossConfig) -> dict:
    return {"gather": config.gather_across_ranks}


def build_image_text(config: LossConfig, fusion_score: str):
    return ImageTextContrastiveLoss(**_gather(config))


def build_detail(config: LossConfig, fusion_score: str):
    return DetailLoss(*_hard(config), **_gather(config))


def build_joint(config: LossConfig, fusion_score: str):
    return JointLoss(build_detail(config, fusion_score), ContrastiveLoss(**_gather(config)), gamma=config.gamma)


def build_fused(config: LossConfig, fusion_score: str):
    """L_C scored by the model's fusion rule, with L_DI's hard-negative switches."""
    return FusedContrastiveLoss(fusion_score, *_hard(config), **_gather(config))


def _branch_loss(branches: tuple[str, ...], model, loss_fn, batch: dict[str, torch.Tensor], images: str
                 ) -> dict[str, torch.Tensor]:
    """The detail (``branches`` ("di",)) and joint (("gm", "di")) objectives: encode the batch and apply the loss.
    The DI branch encodes the reference only when its loss uses it, and the subset negatives whenever the batch has
    them (``loss.subset_negatives`` > 0)."""
    detail = loss_fn.detail if "gm" in branches else loss_fn
    out = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        branches=branches,
        with_reference_targets=detail.uses_references,
        **{f"reference_{images}": batch["reference"], f"target_{images}": batch["target"]},
    )
    di = dict(query=out.query_di, targets=out.target_di, temperature=model.di_branch.temperature(),
              references=out.reference_di)
    if "subset" in batch:  # [B, K, ...] near-duplicates -> DI target features [B, K, Nq, D]
        di["subset_negatives"] = model.di_branch.encode_target(_flat_embeds(model, batch["subset"], images)).unflatten(
            0, batch["subset"].shape[:2])
    if "gm" not in branches:
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


def fused_loss(model, loss_fn, row: dict[str, torch.Tensor], images: str = "embeds") -> dict[str, torch.Tensor]:
    """The fused objective (stage 3) on cached rows (``branch_outputs``): compose, then L_C with the row's reference
    and subset gallery embeddings where present, and the step's gallery bank (``bank``, ``bank_mask``) when dealt."""
    gm = BranchQueryOutput(row["q_gm"], row["h_gm"], row["m_gm"])
    di = BranchQueryOutput(row["q_di"], row["h_di"], row["m_di"])
    unified = model.compose(gm, di).query
    bank = {"bank": row["bank"], "bank_mask": row["bank_mask"]} if "bank" in row else {}
    return loss_fn(unified, row["gallery"], model.unified_temperature(), references=row.get("reference_gallery"),
                   subset_negatives=row.get("subset_gallery"), **bank)


def detail_loss(model, loss_fn, batch: dict[str, torch.Tensor], images: str) -> dict[str, torch.Tensor]:
    return _branch_loss(("di",), model, loss_fn, batch, images)


def joint_loss(model, loss_fn, batch: dict[str, torch.Tensor], images: str) -> dict[str, torch.Tensor]:
    return _branch_loss(("gm", "di"), model, loss_fn, batch, images)


OBJECTIVES.register("image_text", Objective(build_image_text, image_text_loss, "captions", near_duplicates=False))
OBJECTIVES.register("detail", Objective(build_detail, detail_loss, "triplets", near_duplicates=True))
OBJECTIVES.register("joint", Objective(build_joint, joint_loss, "triplets", near_duplicates=True))
OBJECTIVES.register("fused", Objective(build_fused, fused_loss, "branch_outputs", near_duplicates=True))
