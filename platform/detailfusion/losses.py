"""Losses of METHOD.md: ``L_GM`` / ``L_C`` (in-batch InfoNCE), ``L_DI`` (with hard negatives), ``L_joint`` and
stage 0's image-text contrastive loss (BLIP-2's ITC).

Feature shapes: queries [B, D] (unit norm), targets / references [B, Nq, D] (unit norm per token), subset
negatives [B, S, Nq, D]. Similarity ``s(q, t) = max_k <q, t_k>``; logits are ``s / tau``.
Across data-parallel ranks the target side is gathered (with gradients) so every rank's queries see the
whole global batch; each rank's loss is the mean over its own queries, so averaging gradients over ranks
(what DeepSpeed / DDP do) gives the gradient of the global-batch loss.
Every loss returns a dict of named parts; ``"loss"`` is what to back-propagate.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

from .errors import ConfigError
from .model.fusion import check_rule, fused_scores


def gather_features(features: torch.Tensor, rank: int, world_size: int, with_grad: bool = True) -> torch.Tensor:
    """Concatenate ``features`` [B, ...] of all ranks along dim 0 -> [world_size * B, ...] (equal B on every rank).

    ``with_grad``: every rank's loss back-propagates into every rank's shard (gradients summed over ranks);
    otherwise the gathered copies are constants and only the local shard, put back at ``[rank]``, has a gradient.
    """
    if world_size == 1:
        return features
    if with_grad:
        return _GatherWithGrad.apply(features)
    parts = [torch.empty_like(features) for _ in range(world_size)]
    dist.all_gather(parts, features.contiguous())
    parts[rank] = features
    return torch.cat(parts, dim=0)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums the gradient over ranks (all_reduce) and returns this rank's slice.

    Written on all_gather + all_reduce because both run on gloo (CPU) and nccl alike.
    """

    @staticmethod
    def forward(ctx, features: torch.Tensor) -> torch.Tensor:
        ctx.rank, ctx.batch = dist.get_rank(), features.shape[0]
        parts = [torch.empty_like(features) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, features.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.batch : (ctx.rank + 1) * ctx.batch]


def max_similarity(query: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``max_k <q_b, t_{n,k}>`` for every query/target pair: [B, D] x [N, Nq, D] -> [B, N], in fp32 (also under
    autocast: the similarity logits of every loss are fp32, METHOD.md "Precision")."""
    with torch.autocast(query.device.type, enabled=False):
        return torch.einsum("bd,nkd->bnk", query.float(), targets.float()).amax(dim=-1)


def paired_similarity(query: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``max_k <q_b, t_{b,...,k}>`` for each query and its own items: [B, D] x [B, ..., Nq, D] -> [B, ...] (fp32)."""
    flat = targets.reshape(targets.shape[0], -1, targets.shape[-2], targets.shape[-1])
    with torch.autocast(query.device.type, enabled=False):
        sims = torch.einsum("bd,bskd->bsk", query.float(), flat.float()).amax(dim=-1)
    return sims.reshape(targets.shape[:-2])


class _RankAware(nn.Module):
    """Holds the gather settings (open_clip's ``ClipLoss`` pattern); rank/world_size default to the process group."""

    def __init__(self, gather: bool = True, rank: int | None = None, world_size: int | None = None):
        super().__init__()
        distributed = dist.is_available() and dist.is_initialized()
        self.world_size = world_size if world_size is not None else (dist.get_world_size() if distributed else 1)
        self.rank = rank if rank is not None else (dist.get_rank() if distributed else 0)
        self.gather = gather and self.world_size > 1

    def _global(self, features: torch.Tensor) -> torch.Tensor:
        return gather_features(features, self.rank, self.world_size) if self.gather else features

    def _labels(self, batch: int, device: torch.device) -> torch.Tensor:
        offset = self.rank * batch if self.gather else 0
        return torch.arange(batch, device=device) + offset


class ContrastiveLoss(_RankAware):
    """In-batch InfoNCE of queries over the (global) batch's targets: ``L_GM``, and ``L_C`` on unified features."""

    def target_logits(self, query: torch.Tensor, targets: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
        """[B, D], [B, Nq, D] -> [B, world_size * B] logits against every target of the global batch."""
        return max_similarity(query, self._global(targets)) / temperature

    def forward(self, query: torch.Tensor, targets: torch.Tensor, temperature: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.target_logits(query, targets, temperature)
        return {"loss": F.cross_entropy(logits.float(), self._labels(query.shape[0], query.device))}


class FusedContrastiveLoss(ContrastiveLoss):
    """``L_C`` (stage 3): InfoNCE of unified queries [B, 2D] over the batch's gallery embeddings [B, Nq, 2D] scored by
    the model's fusion score (``model/fusion.py``: ``branch_max`` or ``joint_max``)."""

    def __init__(self, fusion_score: str = "branch_max", **rank_settings):
        super().__init__(**rank_settings)
        self.fusion_score = check_rule(fusion_score)

    def target_logits(self, query: torch.Tensor, targets: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
        return fused_scores(query, self._global(targets), self.fusion_score) / temperature


class DetailLoss(ContrastiveLoss):
    """``L_DI``: InfoNCE whose negatives also include the query's own reference image (and optional extras).

    reference_negative: add ``s(q_i, r_i)`` as a negative. Off: the paper's "without L_DI" ablation, the loss equals
        ``L_GM`` exactly (no hard negative of any kind: subset negatives are ignored too).
    hard_negative_scale: ``w >= 1`` multiplies the hard negatives' exp-logits (``+log w``): own reference and
        subset negatives. Other queries' references are plain negatives.
    batch_reference_negatives: the references of every query of the (global) batch are negatives too.
    Subset negatives (near-duplicates of the reference, e.g. CIRR ``img_set`` members) come per call.
    """

    def __init__(
        self,
        reference_negative: bool = True,
        hard_negative_scale: float = 1.0,
        batch_reference_negatives: bool = False,
        **rank_settings,
    ):
        super().__init__(**rank_settings)
        if hard_negative_scale < 1.0:
            raise ConfigError(f"hard_negative_scale must be >= 1, got {hard_negative_scale}")
        self.reference_negative = reference_negative
        self.log_scale = math.log(hard_negative_scale)
        self.batch_reference_negatives = batch_reference_negatives

    def forward(
        self,
        query: torch.Tensor,
        targets: torch.Tensor,
        temperature: torch.Tensor,
        references: torch.Tensor | None = None,
        subset_negatives: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """query [B, D]; targets, references [B, Nq, D]; subset_negatives [B, S, Nq, D] or None."""
        columns = [self.target_logits(query, targets, temperature)]
        if not self.reference_negative:
            return {"loss": F.cross_entropy(columns[0], self._labels(query.shape[0], query.device))}
        if references is None:
            raise ValueError("L_DI with reference_negative=True needs the references' DI target features")
        own = paired_similarity(query, references) / temperature + self.log_scale  # [B]
        if self.batch_reference_negatives:
            batch_refs = max_similarity(query, self._global(references)) / temperature  # [B, world * B]
            mine = self._labels(query.shape[0], query.device)
            columns.append(batch_refs.scatter(1, mine[:, None], own[:, None]))
        else:
            columns.append(own[:, None])
        if subset_negatives is not None and subset_negatives.shape[1] > 0:
            columns.append(paired_similarity(query, subset_negatives) / temperature + self.log_scale)
        logits = torch.cat(columns, dim=1)
        return {"loss": F.cross_entropy(logits.float(), self._labels(query.shape[0], query.device))}


class ImageTextContrastiveLoss(_RankAware):
    """BLIP-2's image-text contrastive loss (stage 0): texts [B, D] against images' query tokens [B, Nq, D] with
    ``s = max_k <t, i_k> / tau``, InfoNCE text-to-image and image-to-text over the (global) batch, averaged."""

    def forward(self, text: torch.Tensor, images: torch.Tensor, temperature: torch.Tensor) -> dict[str, torch.Tensor]:
        labels = self._labels(text.shape[0], text.device)
        text_to_image = max_similarity(text, self._global(images)) / temperature  # [B, world * B]
        image_to_text = max_similarity(self._global(text), images).T / temperature  # [B, world * B]
        loss_t2i, loss_i2t = F.cross_entropy(text_to_image, labels), F.cross_entropy(image_to_text, labels)
        return {"loss": (loss_t2i + loss_i2t) / 2, "loss_t2i": loss_t2i, "loss_i2t": loss_i2t}


class JointLoss(nn.Module):
    """``L_joint = L_DI(DI branch) + gamma * L_GM(GM branch)`` (stage 2)."""

    def __init__(self, detail: DetailLoss, matching: ContrastiveLoss, gamma: float = 2.0):
        super().__init__()
        self.detail, self.matching, self.gamma = detail, matching, gamma

    def forward(self, gm: dict[str, torch.Tensor], di: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """gm: {query, targets, temperature}; di: the same plus references / subset_negatives."""
        loss_di = self.detail(**di)["loss"]
        loss_gm = self.matching(**gm)["loss"]
        return {"loss": loss_di + self.gamma * loss_gm, "loss_di": loss_di, "loss_gm": loss_gm}
