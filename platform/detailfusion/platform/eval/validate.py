"""Validation recall inside a training run: the protocol, variants and metric code of ``evaluate``, run in the
training process on a model already in memory (no Ray Data: a validation split is small). Ray Tune scores
sweep trials on it, never on the training loss.

Which variant scores a stage is the stage's ``validation_variant`` (``train/stages.py``): stage 0 pre-trains the GM
Q-Former, so ``gm``; stage 1 trains only the DI branch, so ``di``; stage 2 trains both branches and no compositor
yet, so ``static`` (the equal blend); stage 3 the model's own compositor.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from detailfusion.library.data.manifest import read_manifest
from detailfusion.library.datasets import evaluable
from detailfusion.library.errors import DataError
from detailfusion.library.eval.protocols import SplitRanks
from detailfusion.library.eval.variants import variant_queries
from detailfusion.library.index.exact import GalleryIndex
from detailfusion.library.model.inference import QueryFeatures, embed_gallery, embed_queries
from detailfusion.platform.data.training_input import PIXELS, load_image_store


class ValidationSplit:
    """A labelled prepared CIRR or FashionIQ split (its triplets, gallery and decoded images), loaded once."""

    def __init__(self, prepared_dir: str | Path, targets: dict[str, str] | None = None):
        """``targets``: {sample_id: target image id} for a split whose targets are held apart (synthetic test1)."""
        self.path = Path(prepared_dir)
        manifest = read_manifest(self.path)
        if manifest.layout != "gallery":
            raise DataError(f"{prepared_dir}: a {manifest.dataset} split has no gallery to validate on "
                             "(give a prepared CIRR or FashionIQ split)")
        self.dataset = manifest.dataset
        self.protocol = evaluable(manifest.dataset, f"{prepared_dir}").protocol
        self.triplets = pq.read_table(self.path / "triplets")
        if targets is not None:
            ids = self.triplets.column("sample_id").to_pylist()
            missing = [s for s in ids if s not in targets]
            if missing:
                raise DataError(f"{prepared_dir}: no target given for {len(missing)} queries, e.g. {missing[0]}")
            column = self.triplets.schema.get_field_index("target_id")
            self.triplets = self.triplets.set_column(column, "target_id", pa.array([targets[s] for s in ids], pa.string()))
        if self.triplets.column("target_id").null_count:
            raise DataError(f"{prepared_dir}: split {manifest.split!r} has no targets to validate against")
        self.gallery = pq.read_table(self.path / "gallery.parquet")
        self.position, self.images = load_image_store(self.path, PIXELS)
        self.image_ids = list(dict.fromkeys(self.gallery.column("image_id").to_pylist()))

    @torch.no_grad()
    def metrics(self, model, tokenizer, variants: list[str], batch_size: int = 64) -> dict[str, dict[str, float]]:
        """{variant: metrics} of ``model`` (in eval mode, on its device) under the split's protocol."""
        ranks = self.ranks(model, tokenizer, variants, batch_size)[1]
        return {variant: ranks.metrics(variant) for variant in variants}

    @torch.no_grad()
    def ranks(self, model, tokenizer, variants: list[str], batch_size: int = 64) -> tuple[QueryFeatures, SplitRanks]:
        """The split's query features and every variant's target ranks under the dataset's protocol."""
        features, index, queries = self.encode(model, tokenizer, batch_size)
        gallery = self.gallery.select(["image_id", "category"])
        return features, self.protocol.split_ranks(self.triplets, gallery, index, queries, variants)

    @torch.no_grad()
    def encode(self, model, tokenizer, batch_size: int = 64) -> tuple[QueryFeatures, GalleryIndex, dict]:
        """The split's query features, its gallery index and {variant: queries} under ``model``."""
        device = next(model.parameters()).device
        pixels = lambda rows: torch.from_numpy(self.images[rows]).to(device)  # noqa: E731
        rows = [self.position[i] for i in self.image_ids]
        embeddings = torch.cat([embed_gallery(model, pixels(rows[i:i + batch_size])).float().cpu()
                                for i in range(0, len(rows), batch_size)])
        index = GalleryIndex(embeddings, self.image_ids, model_fingerprint="in-training",
                             fusion_score=model.config.fusion_score)
        references = self.triplets.column("reference_id").to_pylist()
        texts = [str(t) for t in self.triplets.column("text").to_pylist()]
        parts = [embed_queries(model, tokenizer, pixels([self.position[r] for r in references[i:i + batch_size]]),
                                texts[i:i + batch_size]) for i in range(0, len(texts), batch_size)]
        joined = {name: torch.cat([p[name] for p in parts]) for name in parts[0]}
        features = QueryFeatures(self.triplets.column("sample_id").to_pylist(), **joined)
        return features, index, variant_queries(features, index, references, model.config.compositor)
