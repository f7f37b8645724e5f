"""Training input: prepared shards -> a Ray Dataset of tokenised, fixed-shape batches -> each Train worker's shard.

Driver side, ``training_dataset(prepared_dir, tokenizer, max_text_length)`` builds the Dataset handed to
``TorchTrainer(datasets={"train": ...})``. Rows get their images attached by an actor that holds the split's
image store (uint8 pixels, or frozen-ViT features when the cache exists and ``use_features``), and their
text tokenised (FashionIQ train: one of the four caption forms, drawn anew every epoch).
Worker side, ``iter_worker_batches(batch_size)`` iterates ``ray.train.get_dataset_shard("train")`` with
``drop_last=True`` so every rank runs the same number of steps.

Batch columns: input_ids, attention_mask [B, L] int64; sample_key [B] int64 (stable hash of sample_id);
reference / target: pixels uint8 [B, S, S, 3] or features float16 [B, T, W]; ``source`` says which;
with ``subset_negatives=K``: subset [B, K, ...] images of K members of the query's near-duplicate set (CIRR
``img_set``) other than its reference and target, drawn anew every epoch (the reference fills in when a set
has fewer than K others).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow.parquet as pq

FEATURES, PIXELS = "features", "pixels"


def read_manifest(prepared_dir: str | Path) -> dict:
    path = Path(prepared_dir) / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"{prepared_dir}: no manifest.json; run `detailfusion prepare` for this split first")
    return json.loads(path.read_text())


def sample_key(sample_id: str) -> int:
    """A stable non-negative int64 for a sample id (tensors cannot carry strings)."""
    return int.from_bytes(hashlib.sha1(sample_id.encode()).digest()[:8], "little") >> 1


def load_image_store(prepared_dir: str | Path, source: str) -> tuple[dict[str, int], np.ndarray]:
    """All images of a gallery-layout split: ({image_id: row}, array [N, S, S, 3] uint8 or [N, T, W] float16)."""
    import ray.data  # noqa: F401  (registers Ray's tensor extension type for pyarrow)

    folder = Path(prepared_dir) / ("features" if source == FEATURES else "images")
    table = pq.read_table(folder)
    column = "features" if source == FEATURES else "pixels"
    ids = table.column("image_id").to_pylist()
    array = table.column(column).combine_chunks().to_numpy() if len(ids) else np.zeros((0,))
    return {image_id: i for i, image_id in enumerate(ids)}, np.asarray(array)


class TripletBatcher:
    """Ray Data actor: canonical triplet rows -> tokenised text + attached images (see module docstring)."""

    def __init__(self, prepared_dir: str, tokenizer, max_text_length: int, source: str, layout: str,
                 subset_negatives: int = 0):
        self.tokenizer, self.max_text_length, self.source, self.layout = tokenizer, max_text_length, source, layout
        self.subset_negatives = subset_negatives
        self.rng = np.random.default_rng()
        self.index, self.store = load_image_store(prepared_dir, source) if layout == "gallery" else ({}, None)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        texts = [str(self.rng.choice(list(v))) for v in batch["text_variants"]]
        tokens = self.tokenizer(texts, padding="max_length", truncation=True, max_length=self.max_text_length,
                                return_tensors="np")
        out = {
            "input_ids": tokens["input_ids"].astype(np.int64),
            "attention_mask": tokens["attention_mask"].astype(np.int64),
            "sample_key": np.array([sample_key(s) for s in batch["sample_id"]], dtype=np.int64),
        }
        if self.layout == "inline":
            suffix = "features" if self.source == FEATURES else "pixels"
            out["reference"], out["target"] = batch[f"reference_{suffix}"], batch[f"target_{suffix}"]
        else:
            out["reference"] = self.store[[self.index[i] for i in batch["reference_id"]]]
            out["target"] = self.store[[self.index[i] for i in batch["target_id"]]]
            if self.subset_negatives:
                out["subset"] = self.store[self._subset_rows(batch)]
        return out

    def _subset_rows(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        """[B, K] image-store rows of K set members other than each query's reference and target."""
        rows = []
        for members, reference, target in zip(batch["subset_ids"], batch["reference_id"], batch["target_id"]):
            others = [m for m in members if m not in (reference, target) and m in self.index]
            picked = list(self.rng.permutation(others)[: self.subset_negatives])
            picked += [reference] * (self.subset_negatives - len(picked))
            rows.append([self.index[m] for m in picked])
        return np.asarray(rows, dtype=np.int64)


def training_dataset(prepared_dir: str | Path, tokenizer, max_text_length: int, use_features: bool = True,
                     batch_size: int = 64, vision_fingerprint: str | None = None, actor_cpus: float = 1.0,
                     subset_negatives: int = 0):
    """The Ray Dataset of one prepared split for training (rows without a target are refused).

    ``use_features``: read the frozen-ViT cache when the split has one; ``vision_fingerprint`` (of the model
    about to train) must then match the cache's, or the cache belongs to another ViT. ``actor_cpus``: CPUs of
    the attaching actor (fractional on small machines, where whole CPUs would starve the Train workers).
    ``subset_negatives``: K near-duplicate images per row (gallery-layout splits with ``img_set``s only).
    """
    import ray

    manifest = read_manifest(prepared_dir)
    cache = manifest.get("features")
    source = FEATURES if use_features and cache else PIXELS
    if source == FEATURES and vision_fingerprint and cache["fingerprint"] != vision_fingerprint:
        raise ValueError(
            f"{prepared_dir}: its feature cache was made by a vision encoder with fingerprint {cache['fingerprint']}, "
            f"the model has {vision_fingerprint}; rebuild the cache or train without it (use_features=false)"
        )
    layout = manifest["layout"]
    if subset_negatives and layout != "gallery":
        raise ValueError(f"{prepared_dir}: subset negatives need near-duplicate sets (CIRR img_set); "
                         f"{manifest['dataset']} has none")
    rows_dir = Path(prepared_dir) / ("features" if source == FEATURES and layout == "inline" else "triplets")
    if layout == "gallery":  # annotation rows are small: hand them to Ray Data from memory, no file-listing task
        table = pq.read_table(rows_dir)
        unlabelled = table.column("target_id").null_count
        if unlabelled:
            raise ValueError(f"{prepared_dir}: {unlabelled} triplets have no target (a test split?); cannot train on it")
        dataset = ray.data.from_arrow(table)
    else:  # inline images: stream the shards
        dataset = ray.data.read_parquet(str(rows_dir), num_cpus=actor_cpus)
    return dataset.map_batches(
        TripletBatcher,
        fn_constructor_kwargs=dict(prepared_dir=str(prepared_dir), tokenizer=tokenizer,
                                   max_text_length=max_text_length, source=source, layout=layout,
                                   subset_negatives=subset_negatives),
        batch_size=batch_size,
        batch_format="numpy",
        concurrency=1,
        num_cpus=actor_cpus,
    )


def iter_worker_batches(batch_size: int, device=None, dataset: str = "train", pin_memory: bool = False) -> Iterator[dict]:
    """Inside ``train_loop_per_worker``: this rank's shard as torch batches of ``batch_size`` (drop_last), on the
    worker's device (Ray Data's default), staged in pinned host memory with ``pin_memory`` (GPU workers)."""
    import ray.train

    shard = ray.train.get_dataset_shard(dataset)
    kwargs = {"device": device} if device is not None else {}
    yield from shard.iter_torch_batches(batch_size=batch_size, drop_last=True, pin_memory=pin_memory, **kwargs)
