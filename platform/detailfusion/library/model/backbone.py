"""Build DetailFusion models from named presets (JSON files in ``presets/``) and from BLIP-2 checkpoints.

``tiny``: small BLIP-2 parts and a tiny WordPiece tokenizer, trainable on a CPU; its frozen ViT is the stand-in for
BLIP-2's EVA-CLIP ViT, pre-trained once (``detailfusion pretrain-vit``) and shipped in ``presets/tiny_vit/``
(``vision_weights="random"`` keeps it random-initialised); the Q-Former branches start random (stage 0 pre-trains them).
``blip2``: ViT-G + Q-Former from a ``Blip2ForImageTextRetrieval`` checkpoint (local dir or hub id); both
branches start from its Q-Former, query tokens and projections (``vision_projection`` / ``text_projection``
in transformers 5.x, ``vision_proj`` / ``text_proj`` here, as in LAVIS).
"""

from __future__ import annotations

import copy
import hashlib
import json
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from transformers import Blip2ForImageTextRetrieval, PreTrainedTokenizerBase

from detailfusion.library.errors import ConfigError
from detailfusion.library.model.configuration import DetailFusionConfig
from detailfusion.library.model.detailfusion import DetailFusionModel
from detailfusion.library.model.tokenizer import build_tiny_tokenizer, load_tokenizer

_PRESET_DIR = resources.files(__package__) / "presets"


def list_presets() -> list[str]:
    return sorted(p.name[: -len(".json")] for p in _PRESET_DIR.iterdir() if p.name.endswith(".json"))


def load_preset(name: str) -> dict[str, Any]:
    """The preset's JSON as a fresh dict (callers may change it)."""
    path = _PRESET_DIR / f"{name}.json"
    if not path.is_file():
        raise ConfigError(f"unknown model preset {name!r}; known: {', '.join(list_presets())}")
    return copy.deepcopy(json.loads(path.read_text()))


VISION_WEIGHTS = ("pretrained", "random")


def build_model(
    preset: str = "tiny", pretrained: str | None = None, vision_weights: str = "pretrained", **config_overrides: Any
) -> tuple[DetailFusionModel, PreTrainedTokenizerBase]:
    """A fresh model and its tokenizer. ``config_overrides`` set ``DetailFusionConfig`` fields (e.g. compositor).

    For ``blip2``, ``pretrained`` (default: the preset's hub id) names the BLIP-2 retrieval checkpoint. For a preset
    with shipped ViT weights (``tiny``), ``vision_weights``: ``pretrained`` loads them into the frozen
    ``vision_model`` (``backbone_source`` names them and their sha256), ``random`` leaves it random-initialised.
    """
    if vision_weights not in VISION_WEIGHTS:
        raise ConfigError(f"vision_weights must be one of {', '.join(VISION_WEIGHTS)}, not {vision_weights!r}")
    spec = load_preset(preset)
    fields = {**spec["config"], **config_overrides}
    if spec["tokenizer"] == "pretrained":
        if vision_weights != "pretrained":
            raise ConfigError(f"preset {preset!r} takes its ViT from the BLIP-2 checkpoint; vision_weights="
                              f"{vision_weights!r} is not available for it")
        source = pretrained or spec["pretrained"]
        return from_blip2(source, **fields), load_tokenizer(source)
    if pretrained is not None:
        raise ConfigError(f"preset {preset!r} is built here, not from a checkpoint; pretrained={pretrained!r} is not "
                          f"used by it")
    tokenizer = build_tiny_tokenizer(fields["qformer_config"]["vocab_size"])
    vision = spec.get("vision_weights") if vision_weights == "pretrained" else None
    if vision is None:
        return DetailFusionModel(DetailFusionConfig(**fields)), tokenizer
    state, digest = read_vision_weights(vision, fields["vision_config"])
    model = DetailFusionModel(DetailFusionConfig(**{**fields, "backbone_source": f"{vision} sha256:{digest}"}))
    model.vision_model.load_state_dict(state)
    return model, tokenizer


def read_vision_weights(name: str, vision_config: dict) -> tuple[dict[str, torch.Tensor], str]:
    """The ViT state dict shipped in ``presets/<name>/`` (model.safetensors + config.json, written by
    ``vit_pretraining.save_vit``) and its file's sha256; refused when its config's shape differs from ``vision_config``."""
    from safetensors.torch import load

    directory = _PRESET_DIR / name
    weights, config = directory / "model.safetensors", directory / "config.json"
    if not (weights.is_file() and config.is_file()):
        raise ConfigError(f"{directory}: no shipped ViT weights (model.safetensors, config.json); write them with "
                          f"`detailfusion pretrain-vit --out {directory}` or build with vision_weights='random'")
    shipped = json.loads(config.read_text())
    differs = {k: (v, shipped.get(k)) for k, v in vision_config.items() if k != "initializer_range" and shipped.get(k) != v}
    if differs:
        raise ConfigError(f"{directory}: the shipped ViT's config differs from the preset's vision_config "
                          f"(key: (preset, shipped)): {differs}")
    data = weights.read_bytes()
    return load(data), hashlib.sha256(data).hexdigest()


def from_blip2(path_or_id: str, **config_overrides: Any) -> DetailFusionModel:
    """DetailFusion with the frozen ViT and both branches initialised from a BLIP-2 retrieval checkpoint."""
    source = Blip2ForImageTextRetrieval.from_pretrained(path_or_id, dtype=torch.float32)
    blip = source.config
    config = DetailFusionConfig(
        vision_config=blip.vision_config.to_dict(),
        qformer_config=blip.qformer_config.to_dict(),
        **{
            **config_overrides,
            "num_query_tokens": blip.num_query_tokens,
            "embed_dim": blip.image_text_hidden_size,
            "backbone_source": str(path_or_id),
        },
    )
    model = DetailFusionModel(config)
    model.vision_model.load_state_dict(source.vision_model.state_dict())
    with torch.no_grad():
        for branch in (model.gm_branch, model.di_branch):
            branch.query_tokens.copy_(source.query_tokens)
            branch.embeddings.load_state_dict(source.embeddings.state_dict())
            branch.qformer.load_state_dict(source.qformer.state_dict())
            branch.vision_proj.load_state_dict(source.vision_projection.state_dict())
            branch.text_proj.load_state_dict(source.text_projection.state_dict())
    return model


def save_model(model: DetailFusionModel, tokenizer: PreTrainedTokenizerBase, directory: str | Path,
               dtype: torch.dtype | None = None) -> Path:
    """Export model (safetensors + config.json) and tokenizer into one directory; ``dtype``: the weights' type in the
    files (default: as the model holds them; the model itself is left unchanged). Atomic: written into a temporary
    directory beside ``directory`` and renamed into place (an existing export is replaced), so a crash mid-write
    never leaves a half-written export under the real name."""
    import os
    import shutil
    import tempfile

    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    state = None if dtype is None else {k: v.to(dtype) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    partial = Path(tempfile.mkdtemp(prefix=f".{directory.name}.partial-", dir=directory.parent))
    try:
        model.save_pretrained(partial, state_dict=state)
        tokenizer.save_pretrained(partial)
        for path in partial.iterdir():  # on disk before the rename makes them the export
            with path.open("rb") as f:
                os.fsync(f.fileno())
        old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
        if directory.exists():
            os.rename(directory, old)
        os.rename(partial, directory)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return directory


def load_model(directory: str | Path, dtype: torch.dtype = torch.float32) -> tuple[DetailFusionModel, PreTrainedTokenizerBase]:
    """Load what ``save_model`` wrote (no pickle: safetensors weights, JSON config), as ``dtype`` whatever the file
    holds (fp32 by default: training keeps fp32 master weights; a bf16 export is upcast). A damaged file is refused
    by name (``check_export``)."""
    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"{directory}: no config.json; not a DetailFusion model directory")
    model = DetailFusionModel.from_pretrained(directory, use_safetensors=True, dtype=dtype)
    return model, load_tokenizer(str(directory))


def model_fingerprint(directory: str | Path) -> str:
    """sha256 prefix over an exported model's weight files and config: names the exact model an index or a
    metrics file came from (a different model, even one training step apart, gives another fingerprint)."""
    import hashlib

    directory = Path(directory)
    files = sorted(directory.glob("*.safetensors")) + [directory / "config.json"]
    if not files[:-1]:
        raise FileNotFoundError(f"{directory}: no *.safetensors weights; not an exported DetailFusion model")
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode())
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                digest.update(chunk)
    return digest.hexdigest()[:16]
