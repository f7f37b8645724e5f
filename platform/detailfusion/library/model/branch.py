"""One Q-Former branch (GM or DI): learned queries, BLIP-2 text embeddings, a Q-Former, two projections and a
temperature. Both branches share the frozen ViT's output ``image_embeds`` [B, T, W] (T image tokens, W ViT width)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from transformers.models.blip_2.modeling_blip_2 import Blip2QFormerModel, Blip2TextEmbeddings

from detailfusion.library.model.configuration import DetailFusionConfig

TEMPERATURE_BOUNDS = (1e-3, 0.5)  # BLIP-2's clamp of every learned softmax temperature


def clamped_temperature(temp: nn.Parameter) -> nn.Parameter:
    """``temp`` [1] clamped in place to ``TEMPERATURE_BOUNDS`` and returned as the parameter itself (BLIP / ALBEF):
    the clamp is no part of the graph, so the gradient reaches the parameter at the bound too (a graph clamp gives
    none past it, and the raw value stays stuck there). The clamp writes ``.data``: it leaves autograd's version
    counter alone, so a second call before ``backward`` (a no-op then) does not invalidate the first one's graph.
    Under ZeRO-1/2 the optimizer's fp32 master copy is not clamped: the next step writes it back, and the next call
    clamps again (the forward always sees a value inside the bounds, the gradient always flows)."""
    low, high = TEMPERATURE_BOUNDS
    temp.data.clamp_(min=low, max=high)
    return temp


@dataclass
class BranchQueryOutput:
    """A composed query encoded by one branch.

    feature: [B, D] ``normalize(text_proj(h_cls))``, h_cls the output at the first text position.
    hidden_states: [B, Nq + L, H] the Q-Former outputs over ``[queries; text]`` (input to the compositor).
    attention_mask: [B, Nq + L] 1 for real tokens, 0 for padding.
    """

    feature: torch.Tensor
    hidden_states: torch.Tensor
    attention_mask: torch.Tensor


class QFormerBranch(nn.Module):
    """Composed-query and target encoders of one branch; names follow the BLIP-2 / LAVIS layout."""

    def __init__(self, config: DetailFusionConfig):
        super().__init__()
        qformer_config = config.qformer_config
        self.num_query_tokens = config.num_query_tokens
        self.query_tokens = nn.Parameter(torch.zeros(1, config.num_query_tokens, qformer_config.hidden_size))
        self.embeddings = Blip2TextEmbeddings(qformer_config)
        self.qformer = Blip2QFormerModel._from_config(qformer_config)
        self.vision_proj = nn.Linear(qformer_config.hidden_size, config.embed_dim)
        self.text_proj = nn.Linear(qformer_config.hidden_size, config.embed_dim)
        self.temp = nn.Parameter(torch.tensor([float(config.init_temperature)]))  # [1]: DeepSpeed cannot broadcast 0-d

    def temperature(self) -> torch.Tensor:
        """The learned softmax temperature [1], clamped in place (``clamped_temperature``)."""
        return clamped_temperature(self.temp)

    def encode_query(
        self, image_embeds: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> BranchQueryOutput:
        """Reference image tokens [B, T, W] + text ids/mask [B, L] -> the composed query."""
        batch = image_embeds.shape[0]
        queries = self.query_tokens.expand(batch, -1, -1)
        mask = torch.cat([attention_mask.new_ones(batch, self.num_query_tokens), attention_mask], dim=1)
        embeds = self.embeddings(input_ids=input_ids, query_embeds=queries)
        hidden = self.qformer(
            query_embeds=embeds,
            query_length=self.num_query_tokens,
            attention_mask=mask,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=self._image_mask(image_embeds),
        ).last_hidden_state
        feature = F.normalize(self.text_proj(hidden[:, self.num_query_tokens, :]).float(), dim=-1)  # fp32 (autocast)
        return BranchQueryOutput(feature=feature, hidden_states=hidden, attention_mask=mask)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Text alone [B, L] -> normalised ``text_proj`` of its first token [B, D] (the text-only baseline)."""
        embeds = self.embeddings(input_ids=input_ids)
        hidden = self.qformer(query_embeds=embeds, query_length=0, attention_mask=attention_mask).last_hidden_state
        return F.normalize(self.text_proj(hidden[:, 0, :]).float(), dim=-1)

    def encode_target(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """Target image tokens [B, T, W] -> normalised query-token features [B, Nq, D]."""
        queries = self.query_tokens.expand(image_embeds.shape[0], -1, -1)
        hidden = self.qformer(
            query_embeds=queries,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=self._image_mask(image_embeds),
        ).last_hidden_state
        return F.normalize(self.vision_proj(hidden[:, : self.num_query_tokens, :]).float(), dim=-1)

    @staticmethod
    def _image_mask(image_embeds: torch.Tensor) -> torch.Tensor:
        return torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
