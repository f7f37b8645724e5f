"""Losses of METHOD.md: ``L_GM`` (in-batch InfoNCE), ``L_DI`` and ``L_C`` (with hard negatives: the own reference,
img_set members, each behind its own switch), ``L_joint`` and stage 0's image-text contrastive loss (BLIP-2's ITC).

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

from detailfusion.library.errors import ConfigError
from detailfusion.library.model.fusion import DEFAULT_FUSION_RULE, check_rule, fused_scores


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
    """In-batch InfoNCE of queries over the (global) batch's targets: ``L_GM``."""

    def target_logits(self, query: torch.Tensor, targets: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
        """[B, D], [B, Nq, D] -> [B, world_size * B] logits against every target of the global batch."""
        return max_similarity(query, self._global(targets)) / temperature

    def forward(self, query: torch.Tensor, targets: torch.Tensor, temperature: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.target_logits(query, targets, temperature)
        return {"loss": F.cross_entropy(logits.float(), self._labels(query.shape[0], query.device))}


class DetailLoss(ContrastiveLoss):
    """``L_DI``: InfoNCE whose negatives also include hard negatives, each kind behind its own switch (each adds its
    own logit columns and touches no other):

    reference_negative: the query's own reference ``s(q_i, r_i)`` (one column). Off, with no subset negatives given
        and ``batch_reference_negatives`` off, the loss equals ``L_GM`` exactly (the paper's "without L_DI").
    subset negatives (near-duplicates of the reference, e.g. CIRR ``img_set`` members): given per call
        (``subset_negatives`` [B, S, Nq, D]: S columns; ``loss.subset_negatives`` sets S), whatever
        ``reference_negative`` says.
    batch_reference_negatives: the references of the (global) batch's other queries (world * B columns; the query's
        own column holds its own reference with ``reference_negative``, else it is masked out).
    hard_negative_scale: ``w >= 1`` multiplies the own reference's and the subset negatives' exp-logits
        (``+log w``); other queries' references are plain negatives.
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

    @property
    def uses_references(self) -> bool:
        """Whether the loss reads the references' target features (callers encode them only then)."""
        return self.reference_negative or self.batch_reference_negatives

    def paired_logits(self, query: torch.Tensor, items: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
        """Each query against its own items: [B, D] x [B, S, Nq, D] -> [B, S] logits."""
        return paired_similarity(query, items) / temperature

    def logits(
        self,
        query: torch.Tensor,
        targets: torch.Tensor,
        temperature: torch.Tensor,
        references: torch.Tensor | None = None,
        subset_negatives: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """fp32 logits [B, world * B targets (+ 1 own reference, or + world * B references with
        batch_reference_negatives) (+ S subset negatives)]; row i's label is its target's column, ``rank * B + i``."""
        columns = [self.target_logits(query, targets, temperature)]
        if self.uses_references:
            if references is None:
                raise ValueError(f"{type(self).__name__} with reference_negative or batch_reference_negatives needs "
                                 "the references' target features")
            own = self.paired_logits(query, references[:, None], temperature)[:, 0] + self.log_scale  # [B]
            if not self.reference_negative:  # only the other queries' references: the own one is masked out
                own = torch.full_like(own, float("-inf"))
            if self.batch_reference_negatives:
                batch_refs = self.target_logits(query, references, temperature)  # [B, world * B]
                mine = self._labels(query.shape[0], query.device)
                columns.append(batch_refs.scatter(1, mine[:, None], own[:, None]))
            else:
                columns.append(own[:, None])
        if subset_negatives is not None and subset_negatives.shape[1] > 0:
            columns.append(self.paired_logits(query, subset_negatives, temperature) + self.log_scale)
        return torch.cat(columns, dim=1).float()

    def forward(
        self,
        query: torch.Tensor,
        targets: torch.Tensor,
        temperature: torch.Tensor,
        references: torch.Tensor | None = None,
        subset_negatives: torch.Tensor | None = None,
        **extra_negatives,
    ) -> dict[str, torch.Tensor]:
        """query [B, D]; targets, references [B, Nq, D]; subset_negatives [B, S, Nq, D] or None; ``extra_negatives``:
        a subclass's own (``FusedContrastiveLoss``'s gallery bank). With hard negatives, also ``hard_negative_mass``:
        the softmax mass on their columns, mean over queries (a diagnostic, no gradient); with a bank, ``bank_mass``
        (its columns' share of that mass)."""
        logits = self.logits(query, targets, temperature, references, subset_negatives, **extra_negatives)
        out = {"loss": F.cross_entropy(logits, self._labels(query.shape[0], query.device))}
        targets_seen = query.shape[0] * (self.world_size if self.gather else 1)
        if logits.shape[1] > targets_seen:
            out["hard_negative_mass"] = logits.detach().softmax(dim=1)[:, targets_seen:].sum(dim=1).mean()
        bank = extra_negatives.get("bank")
        if bank is not None and bank.shape[0]:  # FusedContrastiveLoss's bank: the last G columns
            out["bank_mass"] = logits.detach().softmax(dim=1)[:, -bank.shape[0]:].sum(dim=1).mean()
        return out


class FusedContrastiveLoss(DetailLoss):
    """``L_C`` (stage 3): InfoNCE of unified queries [B, 2D] over the batch's gallery embeddings [B, Nq, 2D] scored by
    the model's fusion score (``model/fusion.py``: ``branch_max`` or ``joint_max``), with ``DetailLoss``'s hard
    negatives as gallery embeddings too (METHOD.md stage 3 [ours]): the query's own reference
    (``reference_negative``), its img_set members (``subset_negatives`` [B, S, Nq, 2D] per call) and optionally the
    batch's references, each switch on its own; none: in-batch InfoNCE. Per call, a gallery bank too
    (``bank`` [G, Nq, 2D], ``bank_mask`` [B, G] true where a bank item is the query's own target): G plain negative
    columns shared by every query (``loss.gallery_negatives``)."""

    def __init__(self, fusion_score: str = DEFAULT_FUSION_RULE, reference_negative: bool = False,
                 hard_negative_scale: float = 1.0, batch_reference_negatives: bool = False, **rank_settings):
        super().__init__(reference_negative, hard_negative_scale, batch_reference_negatives, **rank_settings)
        self.fusion_score = check_rule(fusion_score)

    def target_logits(self, query: torch.Tensor, targets: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
        return fused_scores(query, self._global(targets), self.fusion_score) / temperature

    def logits(self, query: torch.Tensor, targets: torch.Tensor, temperature: torch.Tensor,
               references: torch.Tensor | None = None, subset_negatives: torch.Tensor | None = None,
               bank: torch.Tensor | None = None, bank_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``DetailLoss.logits``, then the bank's G columns (this rank's bank: not gathered), own targets at -inf."""
        logits = super().logits(query, targets, temperature, references, subset_negatives)
        if bank is None or bank.shape[0] == 0:
            return logits
        scores = (fused_scores(query, bank, self.fusion_score) / temperature).float()  # [B, G]
        if bank_mask is not None:
            scores = scores.masked_fill(bank_mask, float("-inf"))
        return torch.cat([logits, scores], dim=1)

    def paired_logits(self, query: torch.Tensor, items: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
        """Each unified query against its own gallery embeddings [B, S, Nq, 2D] -> [B, S], by the one fusion rule:
        scored against all B * S items, each row's own block kept (a batch times a few items)."""
        batch, count = items.shape[:2]
        every = fused_scores(query, items.flatten(0, 1), self.fusion_score).view(batch, batch, count)
        rows = torch.arange(batch, device=query.device)
        return every[rows, rows] / temperature


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

    def __init__(self, detail: DetailLoss, matching: ContrastiveLoss, gamma: float):
        super().__init__()
        self.detail, self.matching, self.gamma = detail, matching, gamma

    def forward(self, gm: dict[str, torch.Tensor], di: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """gm: {query, targets, temperature}; di: the same plus references / subset_negatives."""
        loss_di = self.detail(**di)["loss"]
        loss_gm = self.matching(**gm)["loss"]
        return {"loss": loss_di + self.gamma * loss_gm, "loss_di": loss_di, "loss_gm": loss_gm}
