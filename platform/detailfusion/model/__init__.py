"""DetailFusion model library: no Ray, no training code (those import this, never the reverse)."""

from transformers import AutoConfig, AutoModel

from .backbone import build_model, from_blip2, list_presets, load_model, load_preset, model_fingerprint, save_model
from .branch import BranchQueryOutput, QFormerBranch
from .compositor import CompositorOutput, build_compositor, list_compositors, register_compositor
from .configuration import DetailFusionConfig
from .detailfusion import BRANCHES, DetailFusionModel, DetailFusionOutput

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
