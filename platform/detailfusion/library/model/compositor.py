"""Fusion rules of the two branches' queries, behind a registry (``afc``, ``static``, ``concat_linear``).

Every rule maps the GM and DI query outputs to a unified query ``u`` [B, 2D] that is searched against the
one gallery embedding per image ``t = [t_gm ; t_di] / sqrt 2`` [N, Nq, 2D] under the model's fusion score
(``fusion.py``: ``branch_max`` or ``joint_max``). Rules that blend the branches also return their coefficients
``(a_gm, a_di)`` [B, 2].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

from detailfusion.library.model.branch import BranchQueryOutput
from detailfusion.library.model.configuration import DetailFusionConfig
from detailfusion.library.model.fusion import fused_query
from detailfusion.library.registry import Registry

COMPOSITORS: Registry[type[nn.Module]] = Registry("compositor", __name__)


def register_compositor(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator: ``cls(config: DetailFusionConfig)`` -> ``forward(gm, di) -> CompositorOutput``."""
    return COMPOSITORS.register(name)


def list_compositors() -> list[str]:
    return list(COMPOSITORS.names())


def build_compositor(config: DetailFusionConfig) -> nn.Module:
    return COMPOSITORS.get(config.compositor, "compositor")(config)


@dataclass
class CompositorOutput:
    """query: [B, 2D] unified query; weights: [B, 2] (a_gm, a_di) or None when the rule has none."""

    query: torch.Tensor
    weights: torch.Tensor | None


@register_compositor("static")
class StaticCompositor(nn.Module):
    """Fixed weights for every query: (1, 0) GM-only, (0, 1) DI-only, (.5, .5) static fusion."""

    def __init__(self, config: DetailFusionConfig):
        super().__init__()
        weights = torch.tensor(config.static_weights, dtype=torch.float32)
        self.register_buffer("weights", weights / weights.sum(), persistent=False)
        self.rule = config.fusion_score

    def forward(self, gm: BranchQueryOutput, di: BranchQueryOutput) -> CompositorOutput:
        weights = self.weights.to(gm.feature.dtype).expand(gm.feature.shape[0], -1)
        return CompositorOutput(query=fused_query(gm.feature, di.feature, weights, self.rule), weights=weights)


@register_compositor("afc")
class AdaptiveFeatureCompositor(nn.Module):
    """AFC: a learned token cross-attends to both branches' token states, an MLP predicts softmax(a_gm, a_di).

    The coefficient head starts at zero, so an untrained AFC equals static (.5, .5) fusion.
    """

    def __init__(self, config: DetailFusionConfig):
        super().__init__()
        width, hidden = config.qformer_config.hidden_size, config.compositor_hidden_size
        self.project_gm = nn.Linear(width, hidden)
        self.project_di = nn.Linear(width, hidden)
        self.token = nn.Parameter(torch.zeros(1, 1, hidden))
        layer = nn.TransformerDecoderLayer(
            hidden, config.compositor_heads, 4 * hidden, dropout=0.1, batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerDecoder(layer, config.compositor_layers, norm=nn.LayerNorm(hidden))
        self.head = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, 2))
        self.rule = config.fusion_score

    def forward(self, gm: BranchQueryOutput, di: BranchQueryOutput) -> CompositorOutput:
        memory = torch.cat([self.project_gm(gm.hidden_states), self.project_di(di.hidden_states)], dim=1)
        padding = torch.cat([gm.attention_mask, di.attention_mask], dim=1) == 0
        token = self.token.expand(memory.shape[0], -1, -1)
        pooled = self.blocks(token, memory, memory_key_padding_mask=padding)[:, 0]
        weights = self.head(pooled).float().softmax(dim=-1).to(gm.feature.dtype)
        return CompositorOutput(query=fused_query(gm.feature, di.feature, weights, self.rule), weights=weights)


@register_compositor("concat_linear")
class ConcatLinearCompositor(nn.Module):
    """A learned linear map of ``[q_gm ; q_di]``, renormalised; starts as static (.5, .5) fusion."""

    def __init__(self, config: DetailFusionConfig):
        super().__init__()
        width = 2 * config.embed_dim
        self.weight = nn.Parameter(torch.eye(width))  # [2D, 2D]
        self.bias = nn.Parameter(torch.zeros(width))

    def forward(self, gm: BranchQueryOutput, di: BranchQueryOutput) -> CompositorOutput:
        query = F.normalize(F.linear(torch.cat([gm.feature, di.feature], dim=-1), self.weight, self.bias), dim=-1)
        return CompositorOutput(query=query, weights=None)
