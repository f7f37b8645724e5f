"""The model card (``README.md`` beside the exported weights): what the export is, the data and stages it came
from, its config and its last metrics, with the YAML header model hubs read, so the directory can be shared as it
is."""

from __future__ import annotations

from pathlib import Path

import yaml

from detailfusion.library.config import JobConfig, to_dict
from detailfusion.library.data.manifest import Manifest
from detailfusion.platform.train.stages import STAGES


def model_card(config: JobConfig, manifest: Manifest, metrics: dict, cost: dict | None) -> str:
    """Markdown of the card for the export of ``config``'s stage (``metrics``: the stage's last reported ones)."""
    spec = STAGES[config.train.stage]
    train, optim = config.train, config.optim
    header = {"library_name": "detailfusion", "pipeline_tag": "image-retrieval",
              "tags": ["composed-image-retrieval", "detailfusion", f"stage-{spec.number}"],
              "datasets": [manifest.dataset]}
    shown = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    lines = [
        "---", yaml.safe_dump(header, sort_keys=False).strip(), "---", "",
        f"# DetailFusion: stage {spec.number} ({spec.name}) export", "",
        "A composed image retrieval model: a reference image and a modification text in, the target image of a "
        "gallery out. Two Q-Former branches (global GM, detail DI) and an adaptive compositor fuse their scores "
        "(DetailFusion). Exported by the `detailfusion` platform in `save_pretrained` format (safetensors + JSON).", "",
        "## Use", "", "```python", "from detailfusion.library.model import load_model", "",
        'model, tokenizer = load_model("path/to/this/directory")', "```", "",
        "`detailfusion evaluate --checkpoint <dir> ...` scores it; `detailfusion serve --checkpoint <dir> --index ...`"
        " serves it.", "",
        "## Training data", "",
        f"- dataset **{manifest.dataset}**, split `{manifest.split}`: "
        f"{manifest.triplets} triplets at {manifest.image_size} px "
        f"(prepared split `{config.data.prepared}`, config hash `{manifest.config_hash}`)",
        f"- validation split: `{config.data.val_prepared}`" if config.data.val_prepared else "- no validation split",
        "", "## Training", "",
        f"- starts from: `{config.model.init_from or config.model.preset + ' preset'}` (config.json's "
        "`backbone_source` names the frozen ViT's weights and their sha256)",
        f"- {train.epochs} epoch(s), global batch {train.batch_size}, lr {optim.lr:g}, gamma {config.loss.gamma:g}, "
        f"{train.precision}, ZeRO-{train.zero_stage}, {train.num_workers} worker(s), seed {train.seed}",
    ]
    if cost:
        lines.append(f"- {cost['steps']} steps in {cost['train_s']:.0f} s ({cost['ms_per_step']:.0f} ms/step)")
    lines += ["", "## Metrics (last report of the stage)", ""]
    lines += ["| metric | value |", "|---|---:|"] + [f"| {k} | {v:.4f} |" for k, v in sorted(shown.items())] \
        if shown else ["none reported"]
    lines += ["", "## Config", "", "```yaml", yaml.safe_dump(to_dict(config), sort_keys=False).strip(), "```", ""]
    return "\n".join(lines)


def write_model_card(export_dir: str | Path, config: JobConfig, manifest: Manifest, metrics: dict,
                     cost: dict | None) -> Path:
    path = Path(export_dir) / "README.md"
    path.write_text(model_card(config, manifest, metrics, cost))
    return path
