"""Frozen-ViT feature cache: every unique image of a prepared split encoded once, stored keyed by image id.

The ViT is frozen in every stage, so its tokens for an image never change (METHOD.md); with ViT-G they are
most of a training step's cost. ``prepare --cache-vision-features`` runs the encoder as a Ray Data
``map_batches`` over an actor pool (one GPU each with ``use_gpu``) and writes ``features/`` shards:
gallery layout -> image_id, features float16 [T, W]; inline layout (IPr2Pr) -> the triplet columns with
reference_features / target_features instead of pixels. The cache records the encoder's fingerprint so a
model with another ViT refuses it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from detailfusion.library.config import PrepareConfig
from detailfusion.library.data.manifest import Manifest
from detailfusion.library.data.schema import pixels_from_bytes
from detailfusion.library.errors import DataError
from detailfusion.library.pixels import normalize_pixels


def vision_fingerprint(model) -> str:
    """sha256 prefix over the frozen vision encoder's weights (names, shapes, values)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.vision_model.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def load_vision_model(model_ref: str):
    """A DetailFusion model from an exported directory, or from a preset with fixed pre-trained ViT weights (``blip2``;
    ``tiny``: the shipped stand-in ViT)."""
    from detailfusion.library.model import build_model, load_model

    if Path(model_ref).is_dir():
        return load_model(model_ref)[0]
    return build_model(model_ref)[0]


class VisionEncoder:
    """Ray Data actor: pixel columns (one binary value per uint8 [S, S, 3] image) -> float16 frozen-ViT token
    columns (+ the encoder fingerprint)."""

    def __init__(self, model_ref: str, columns: dict[str, str], use_gpu: bool):
        model = load_vision_model(model_ref)
        self.fingerprint = vision_fingerprint(model)
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.vision = model.to(self.device).eval()
        self.columns = columns

    @torch.no_grad()
    def __call__(self, batch: pa.Table) -> pa.Table:
        from ray.data.extensions import ArrowTensorArray

        out = batch.drop_columns(list(self.columns))  # keeps list columns as real Arrow lists, never pickled
        for source, target in self.columns.items():
            array = pixels_from_bytes(batch.column(source)).copy()  # a writable batch for torch
            pixels = torch.from_numpy(array).to(self.device, non_blocking=True)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
                tokens = self.vision.encode_image(normalize_pixels(pixels))
            out = out.append_column(target, ArrowTensorArray.from_numpy(tokens.to(torch.float16).cpu().numpy()))
        return out.append_column("encoder_fingerprint", pa.array([self.fingerprint] * batch.num_rows, pa.string()))


def cache_vision_features(out: Path, manifest: Manifest, config: PrepareConfig) -> dict:
    """Encode the prepared split at ``out`` and write ``out/features``; returns the manifest's cache entry."""
    import ray

    inline = manifest.layout == "inline"
    columns = {"reference_pixels": "reference_features", "target_pixels": "target_features"} if inline \
        else {"pixels": "features"}
    model_ref = config.model or config.preset
    print(f"prepare: caching frozen-ViT features with {model_ref} on {config.encoder_actors} actor(s)", flush=True)
    (
        ray.data.read_parquet(str(out / ("triplets" if inline else "images")))
        .map_batches(
            VisionEncoder,
            fn_constructor_kwargs=dict(model_ref=model_ref, columns=columns, use_gpu=config.use_gpu),
            batch_size=config.batch_size,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=config.encoder_actors),  # `concurrency` is deprecated (Ray 2.51)
            num_gpus=1 if config.use_gpu else 0,
        )
        .write_parquet(str(out / "features"))
    )
    table = pq.read_table(out / "features", columns=["encoder_fingerprint"])
    fingerprints = set(table.column("encoder_fingerprint").to_pylist())
    if len(fingerprints) != 1:
        raise DataError(f"{out / 'features'}: expected one encoder fingerprint, found {sorted(fingerprints)}")
    import ray.data  # noqa: F401

    sample = pq.read_table(next((out / "features").glob("*.parquet")), columns=[next(iter(columns.values()))])
    shape = list(sample.column(0).type.shape)
    return {"fingerprint": fingerprints.pop(), "model": str(model_ref), "dtype": "float16", "shape": shape,
            "rows": table.num_rows}
