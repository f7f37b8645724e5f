"""The whole DetailFusion model: one frozen BLIP-2 ViT, the GM and DI Q-Former branches, and a compositor.

Shapes: B batch, T image tokens, W ViT width, L text tokens, Nq query tokens, D ``embed_dim``.
The model is a ``PreTrainedModel``: ``save_pretrained`` writes safetensors + config.json, ``from_pretrained``
reads them back without unpickling.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import Blip2VisionModel, PreTrainedModel
from transformers import initialization as init
from transformers.models.blip_2.modeling_blip_2 import Blip2TextEmbeddings
from transformers.utils import ModelOutput

from detailfusion.library.model.branch import BranchQueryOutput, QFormerBranch, clamped_temperature
from detailfusion.library.model.compositor import (
    AdaptiveFeatureCompositor,
    CompositorOutput,
    ConcatLinearCompositor,
    build_compositor,
)
from detailfusion.library.model.configuration import DetailFusionConfig
from detailfusion.library.model.integrity import check_export

BRANCHES = ("gm", "di")


@dataclass
class DetailFusionOutput(ModelOutput):
    """Features of one batch of triplets. Branch features are absent for branches not asked for.

    query_gm / query_di: [B, D]; target_gm / target_di: [B, Nq, D]; reference_di: [B, Nq, D] (the DI branch's
    target encoding of the reference image, the hard negative of L_DI); unified_query: [B, 2D];
    fusion_weights: [B, 2] (a_gm, a_di) or None; gallery: [B, Nq, 2D] unified target embedding.
    """

    query_gm: torch.Tensor | None = None
    query_di: torch.Tensor | None = None
    target_gm: torch.Tensor | None = None
    target_di: torch.Tensor | None = None
    reference_di: torch.Tensor | None = None
    unified_query: torch.Tensor | None = None
    fusion_weights: torch.Tensor | None = None
    gallery: torch.Tensor | None = None


class DetailFusionPreTrainedModel(PreTrainedModel):
    config: DetailFusionConfig
    config_class = DetailFusionConfig
    base_model_prefix = "detailfusion"
    main_input_name = "pixel_values"
    _no_split_modules = ["Blip2EncoderLayer", "Blip2QFormerLayer", "Blip2TextEmbeddings", "Blip2VisionEmbeddings"]

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, QFormerBranch):
            # LAVIS initialises query tokens N(0, std); zeros would make every query token identical forever.
            init.normal_(module.query_tokens, mean=0.0, std=std)
            init.constant_(module.temp, self.config.init_temperature)
        elif isinstance(module, Blip2TextEmbeddings):
            init.copy_(module.position_ids, torch.arange(module.position_ids.shape[-1]).expand((1, -1)))
        elif isinstance(module, AdaptiveFeatureCompositor):
            init.normal_(module.token, mean=0.0, std=std)
            init.zeros_(module.head[-1].weight)
            init.zeros_(module.head[-1].bias)
        elif isinstance(module, ConcatLinearCompositor):
            init.copy_(module.weight, torch.eye(module.weight.shape[0]))
            init.zeros_(module.bias)
        elif isinstance(module, DetailFusionModel):
            init.constant_(module.unified_temp, self.config.init_temperature)


class DetailFusionModel(DetailFusionPreTrainedModel):
    """Frozen ViT + GM branch + DI branch + compositor (METHOD.md)."""

    def __init__(self, config: DetailFusionConfig):
        super().__init__(config)
        self.vision_model = Blip2VisionModel._from_config(config.vision_config)
        self.gm_branch = QFormerBranch(config)
        self.di_branch = QFormerBranch(config)
        self.compositor = build_compositor(config)
        self.unified_temp = nn.Parameter(torch.tensor([float(config.init_temperature)]))  # [1], temperature of L_C
        self.vision_model.requires_grad_(False)
        self.post_init()

    # -- parts ---------------------------------------------------------------------------------------

    def branch(self, name: str) -> QFormerBranch:
        if name not in BRANCHES:
            raise ValueError(f"unknown branch {name!r}; known: {', '.join(BRANCHES)}")
        return self.gm_branch if name == "gm" else self.di_branch

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """``PreTrainedModel.from_pretrained``; a local export is load-checked first (``check_export``: a truncated
        or corrupt file is refused by name)."""
        if Path(str(pretrained_model_name_or_path)).is_dir():
            check_export(pretrained_model_name_or_path)
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    def train(self, mode: bool = True) -> "DetailFusionModel":
        super().train(mode)
        self.vision_model.eval()  # frozen in every stage
        return self

    def unified_temperature(self) -> torch.Tensor:
        """L_C's learned temperature [1], clamped in place (``clamped_temperature``)."""
        return clamped_temperature(self.unified_temp)

    # -- encoders ------------------------------------------------------------------------------------

    @torch.no_grad()
    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Pixels [B, 3, S, S] (CLIP-normalised) -> frozen ViT tokens [B, T, W]; cacheable per image."""
        dtype = self.vision_model.embeddings.patch_embedding.weight.dtype
        return self.vision_model(pixel_values=pixel_values.to(dtype)).last_hidden_state

    def encode_targets(self, image_embeds: torch.Tensor, branches=BRANCHES) -> dict[str, torch.Tensor]:
        """ViT tokens [B, T, W] -> {branch: [B, Nq, D]}."""
        return {name: self.branch(name).encode_target(image_embeds) for name in branches}

    def encode_queries(
        self, image_embeds: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor, branches=BRANCHES
    ) -> dict[str, BranchQueryOutput]:
        """Reference ViT tokens [B, T, W] + text [B, L] -> {branch: composed query}."""
        return {name: self.branch(name).encode_query(image_embeds, input_ids, attention_mask) for name in branches}

    def compose(self, gm: BranchQueryOutput, di: BranchQueryOutput) -> CompositorOutput:
        return self.compositor(gm, di)

    @staticmethod
    def gallery_embedding(target_gm: torch.Tensor, target_di: torch.Tensor) -> torch.Tensor:
        """``[t_gm ; t_di] / sqrt 2``: [B, Nq, D] x 2 -> [B, Nq, 2D], stored once per gallery image."""
        return torch.cat([target_gm, target_di], dim=-1) / math.sqrt(2.0)

    # -- training forward ----------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        reference_pixel_values: torch.Tensor | None = None,
        target_pixel_values: torch.Tensor | None = None,
        reference_embeds: torch.Tensor | None = None,
        target_embeds: torch.Tensor | None = None,
        branches: tuple[str, ...] = BRANCHES,
        with_reference_targets: bool = False,
        compose: bool = False,
    ) -> DetailFusionOutput:
        """Encode a batch of (reference, text, target) triplets for the given branches.

        Images come as pixels [B, 3, S, S] or as cached ViT tokens [B, T, W]. ``with_reference_targets`` also
        encodes the reference through the DI target path (L_DI's hard negative); ``compose`` (needs both
        branches) adds the unified query, fusion weights and unified gallery embedding.
        """
        reference_embeds = self._embeds(reference_embeds, reference_pixel_values, "reference")
        target_embeds = self._embeds(target_embeds, target_pixel_values, "target")
        queries = self.encode_queries(reference_embeds, input_ids, attention_mask, branches)
        targets = self.encode_targets(target_embeds, branches)
        out = DetailFusionOutput()
        for name in branches:
            out[f"query_{name}"] = queries[name].feature
            out[f"target_{name}"] = targets[name]
        if with_reference_targets:
            out["reference_di"] = self.di_branch.encode_target(reference_embeds)
        if compose:
            fused = self.compose(queries["gm"], queries["di"])
            out["unified_query"] = fused.query
            out["fusion_weights"] = fused.weights
            out["gallery"] = self.gallery_embedding(targets["gm"], targets["di"])
        return out

    def _embeds(self, embeds: torch.Tensor | None, pixels: torch.Tensor | None, what: str) -> torch.Tensor:
        if (embeds is None) == (pixels is None):
            raise ValueError(f"give exactly one of {what}_pixel_values or {what}_embeds")
        return embeds if embeds is not None else self.encode_image(pixels)
