"""DetailFusion model library: no Ray, no training code (those import this, never the reverse)."""

from transformers import AutoConfig, AutoModel

from detailfusion.library.model.backbone import (
    build_model,
    from_blip2,
    list_presets,
    load_model,
    load_preset,
    model_fingerprint,
    save_model,
)
from detailfusion.library.model.branch import BranchQueryOutput, QFormerBranch
from detailfusion.library.model.compositor import (
    CompositorOutput,
    build_compositor,
    list_compositors,
    register_compositor,
)
from detailfusion.library.model.configuration import DetailFusionConfig
from detailfusion.library.model.detailfusion import BRANCHES, DetailFusionModel, DetailFusionOutput

AutoConfig.register(DetailFusionConfig.model_type, DetailFusionConfig, exist_ok=True)
AutoModel.register(DetailFusionConfig, DetailFusionModel, exist_ok=True)

__all__ = [
    "BRANCHES",
    "BranchQueryOutput",
    "CompositorOutput",
    "DetailFusionConfig",
    "DetailFusionModel",
    "DetailFusionOutput",
    "QFormerBranch",
    "build_compositor",
    "build_model",
    "from_blip2",
    "list_compositors",
    "list_presets",
    "register_compositor",
    "load_model",
    "load_preset",
    "model_fingerprint",
    "save_model",
]
