"""``DetailFusionConfig``: one HF config composing the frozen ViT, the Q-Former shape both branches share,
and the compositor; it ties their sizes together (the Q-Former cross-attends to the ViT width)."""

from __future__ import annotations

from transformers import Blip2QFormerConfig, Blip2VisionConfig, PreTrainedConfig

from detailfusion.library.errors import ConfigError
from detailfusion.library.model.fusion import DEFAULT_FUSION_RULE, check_rule


def check_static_weights(weights, where: str = "static_weights") -> list[float]:
    """(a_gm, a_di) of the static compositor as floats: two non-negative numbers, not both 0."""
    weights = [float(w) for w in weights]
    if len(weights) != 2 or min(weights) < 0 or sum(weights) <= 0:
        raise ConfigError(f"{where} must be two non-negative numbers, not both 0: {weights}")
    return weights


class DetailFusionConfig(PreTrainedConfig):
    r"""
    vision_config: ``Blip2VisionConfig`` of the frozen image encoder (ViT-G/14 for ``blip2``).
    qformer_config: ``Blip2QFormerConfig`` shared by the GM and DI branches (text input enabled).
    num_query_tokens: learned query tokens per branch (32 in BLIP-2).
    embed_dim: width of the shared retrieval space of ``vision_proj`` / ``text_proj`` (256 in BLIP-2).
    max_text_length: text tokens after the queries (32 in METHOD.md).
    init_temperature: initial softmax temperature of every learned similarity (0.07).
    compositor: name in the compositor registry (``afc``, ``static``, ``concat_linear``).
    compositor_hidden_size / compositor_layers / compositor_heads: the AFC block's shape.
    static_weights: (a_gm, a_di) of the ``static`` compositor; (1, 0) is GM-only, (0, 1) DI-only.
    fusion_score: how the unified query scores a gallery image (``fusion.py``): ``branch_max`` (METHOD.md's default,
        also for configs written before the key existed) or ``joint_max``.
    backbone_source: where the branch weights came from (hub id or path), for reproducibility reports.
    """

    model_type = "detailfusion"
    sub_configs_defaults = {"vision_config": Blip2VisionConfig, "qformer_config": Blip2QFormerConfig}

    vision_config: dict | PreTrainedConfig | None = None
    qformer_config: dict | PreTrainedConfig | None = None
    num_query_tokens: int = 32
    embed_dim: int = 256
    max_text_length: int = 32
    init_temperature: float = 0.07
    compositor: str = "afc"
    compositor_hidden_size: int = 256
    compositor_layers: int = 1
    compositor_heads: int = 4
    static_weights: list[float] | tuple[float, float] = (0.5, 0.5)
    fusion_score: str = DEFAULT_FUSION_RULE
    backbone_source: str | None = None
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.qformer_config.encoder_hidden_size = self.vision_config.hidden_size
        self.qformer_config.use_qformer_text_input = True
        self.static_weights = check_static_weights(self.static_weights)
        check_rule(self.fusion_score)
