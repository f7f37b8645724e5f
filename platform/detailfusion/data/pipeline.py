"""Training input: prepared shards -> a Ray Dataset of tokenised, fixed-shape batches -> each Train worker's shard.

Driver side, ``training_dataset(prepared_dir, tokenizer, max_text_length, epochs=, seed=, batch_size=)`` builds the
Dataset handed to ``TorchTrainer(datasets={"train": ...})``. Gallery splits (CIRR, FashionIQ): ``epoch_plan`` draws
every epoch's rows on the driver (a fresh seeded shuffle, text variant, subset negatives) and tokenises each text
once; one actor holding the image store (uint8 pixels, or frozen-ViT features when the cache exists and
``use_features``) gathers each batch's images. Inline splits (IPr2Pr): the shards stream once per epoch and an
actor tokenises them. Worker side, ``iter_worker_batches(batch_size)`` iterates
``ray.train.get_dataset_shard("train")`` with ``drop_last=True`` so every rank runs the same number of steps.

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

from .schema import pixels_from_bytes

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
    """All images of a gallery-layout split: ({image_id: row}, array [N, S, S, 3] uint8 or [N, T, W] float16).
    Pixels are decoded from their one binary value per image (schema.py) without a copy: the array is read-only."""
    import ray.data  # noqa: F401  (registers Ray's tensor extension type for pyarrow)

    folder = Path(prepared_dir) / ("features" if source == FEATURES else "images")
    table = pq.read_table(folder)
    ids = table.column("image_id").to_pylist()
    if source != FEATURES:
        return {image_id: i for i, image_id in enumerate(ids)}, pixels_from_bytes(table.column("pixels"))
    array = table.column("features").combine_chunks().to_numpy() if len(ids) else np.zeros((0,))
    return {image_id: i for i, image_id in enumerate(ids)}, np.asarray(array)


class TripletBatcher:
    """Ray Data actor for the inline layout (IPr2Pr): triplet rows with their images -> tokenised text + images."""

    def __init__(self, tokenizer, max_text_length: int, source: str, seed: int = 0):
        self.tokenizer, self.max_text_length, self.source = tokenizer, max_text_length, source
        self.rng = np.random.default_rng(seed)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        texts = [str(self.rng.choice(list(v))) for v in batch["text_variants"]]
        tokens = self.tokenizer(texts, padding="max_length", truncation=True, max_length=self.max_text_length,
                                return_tensors="np")
        suffix = "features" if self.source == FEATURES else "pixels"
        reference, target = batch[f"reference_{suffix}"], batch[f"target_{suffix}"]
        if self.source != FEATURES:  # one bytes value per image -> uint8 [B, S, S, 3]
            reference, target = pixels_from_bytes(reference), pixels_from_bytes(target)
        return {
            "input_ids": tokens["input_ids"].astype(np.int64),
            "attention_mask": tokens["attention_mask"].astype(np.int64),
            "sample_key": np.array([sample_key(s) for s in batch["sample_id"]], dtype=np.int64),
            "reference": reference, "target": target,
        }


class GalleryBatcher:
    """Ray Data actor for the gallery layout (CIRR, FashionIQ): index rows -> the batch's tokens and images.

    Holds the split's image store and the token table of every text the plan uses; a batch is gathers only.
    """

    def __init__(self, prepared_dir: str, source: str, input_ids: np.ndarray, attention_mask: np.ndarray):
        self.input_ids, self.attention_mask = input_ids, attention_mask
        _, self.store = load_image_store(prepared_dir, source)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = {"input_ids": self.input_ids[batch["text_row"]], "attention_mask": self.attention_mask[batch["text_row"]],
               "sample_key": batch["sample_key"], "reference": self.store[batch["reference_row"]],
               "target": self.store[batch["target_row"]]}
        if "subset_rows" in batch:
            out["subset"] = self.store[batch["subset_rows"]]
        return out


def epoch_plan(triplets, index: dict[str, int], tokenizer, max_text_length: int, epochs: int, rows_per_epoch: int,
               seed: int, subset_negatives: int = 0) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Every epoch's rows, drawn on the driver: (plan columns, token table).

    Epoch ``e`` is a fresh permutation of the split (seeded by ``seed`` and ``e``, METHOD.md's data order) cut to
    ``rows_per_epoch`` rows; each row's text variant and its ``subset_negatives`` near-duplicates are drawn by the
    same generator. Plan columns, ``epochs * rows_per_epoch`` rows: sample_key int64, text_row (into the token
    table), reference_row / target_row (into the image store) int64, subset_rows [K] int64. Token table: input_ids,
    attention_mask [texts, max_text_length] int64, each distinct text tokenised once.
    """
    variants = triplets.column("text_variants").to_pylist()
    references = np.array([index[i] for i in triplets.column("reference_id").to_pylist()], dtype=np.int64)
    targets = np.array([index[i] for i in triplets.column("target_id").to_pylist()], dtype=np.int64)
    keys = np.array([sample_key(s) for s in triplets.column("sample_id").to_pylist()], dtype=np.int64)
    texts = list(dict.fromkeys(t for v in variants for t in v))
    text_row = {t: i for i, t in enumerate(texts)}
    tokens = tokenizer(texts, padding="max_length", truncation=True, max_length=max_text_length, return_tensors="np")
    table = {"input_ids": tokens["input_ids"].astype(np.int64), "attention_mask": tokens["attention_mask"].astype(np.int64)}
    others = []
    if subset_negatives:
        for members, ref, tgt in zip(triplets.column("subset_ids").to_pylist(), references, targets):
            others.append([index[m] for m in members if m in index and index[m] not in (ref, tgt)])
    columns = {name: [] for name in ("sample_key", "text_row", "reference_row", "target_row", "subset_rows")}
    for epoch in range(epochs):
        rng = np.random.default_rng([seed, epoch])
        order = rng.permutation(len(keys))[:rows_per_epoch]
        columns["sample_key"].append(keys[order])
        columns["text_row"].append(np.array([text_row[variants[i][rng.integers(len(variants[i]))]] for i in order]))
        columns["reference_row"].append(references[order])
        columns["target_row"].append(targets[order])
        if subset_negatives:  # K other members of the set; the reference fills in for a short set
            picks = [list(rng.permutation(others[i])[:subset_negatives]) for i in order]
            columns["subset_rows"].append(np.array([p + [references[i]] * (subset_negatives - len(p))
                                                    for p, i in zip(picks, order)], dtype=np.int64))
    plan = {name: np.concatenate(parts).astype(np.int64) for name, parts in columns.items() if parts}
    return plan, table


def training_dataset(prepared_dir: str | Path, tokenizer, max_text_length: int, use_features: bool = True,
                     vision_fingerprint: str | None = None, actor_cpus: float = 1.0, subset_negatives: int = 0,
                     epochs: int = 1, seed: int = 0, batch_size: int = 32):
    """The Ray Dataset of one prepared split for training (rows without a target are refused).

    Gallery layout (CIRR, FashionIQ): one stream holding all ``epochs``, each a fresh seeded shuffle of the split
    cut to whole global batches of ``batch_size`` (``epoch_plan``), so Ray Data starts once per stage and its
    actor only gathers; input blocks of ``BATCHES_PER_BLOCK`` global batches, order preserved. Inline layout (IPr2Pr): one epoch per
    iteration, streamed from the shards in file order, tokenised by the actor.
    ``use_features``: read the frozen-ViT cache when the split has one; ``vision_fingerprint`` (of the model
    about to train) must then match the cache's, or the cache belongs to another ViT. ``actor_cpus``: CPUs of
    the batching actor (fractional on small machines, where whole CPUs would starve the Train workers).
    ``subset_negatives``: K near-duplicate images per row (gallery-layout splits with ``img_set``s only).
    """
    import ray
    from ray.data import ActorPoolStrategy

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
    actor = dict(compute=ActorPoolStrategy(size=1), num_cpus=actor_cpus, batch_format="numpy")
    if layout != "gallery":  # inline images: stream the shards
        rows_dir = Path(prepared_dir) / ("features" if source == FEATURES else "triplets")
        dataset = ray.data.read_parquet(str(rows_dir), num_cpus=actor_cpus)
        dataset.context.enable_progress_bars = False
        return dataset.map_batches(TripletBatcher, fn_constructor_kwargs=dict(
            tokenizer=tokenizer, max_text_length=max_text_length, source=source, seed=seed),
            batch_size=batch_size, **actor)
    triplets = pq.read_table(Path(prepared_dir) / "triplets")
    unlabelled = triplets.column("target_id").null_count
    if unlabelled:
        raise ValueError(f"{prepared_dir}: {unlabelled} triplets have no target (a test split?); cannot train on it")
    rows_per_epoch = len(triplets) // batch_size * batch_size
    if not rows_per_epoch:
        raise ValueError(f"{prepared_dir}: {len(triplets)} triplets make no global batch of {batch_size}")
    index = {image_id: i for i, image_id in enumerate(pq.read_table(
        Path(prepared_dir) / ("features" if source == FEATURES else "images"), columns=["image_id"]).column(
        "image_id").to_pylist())}
    missing = [sample for sample, ref, tgt in zip(*(triplets.column(c).to_pylist() for c in
                                                      ("sample_id", "reference_id", "target_id")))
               if ref not in index or tgt not in index]
    if missing:
        raise ValueError(f"{prepared_dir}: {len(missing)} triplets name images missing from its image store "
                         f"(e.g. {', '.join(missing[:3])}); run `detailfusion prepare` for this split again")
    plan, tokens = epoch_plan(triplets, index, tokenizer, max_text_length, epochs, rows_per_epoch, seed,
                              subset_negatives)
    rows = _arrow_table(plan)
    block = batch_size * BATCHES_PER_BLOCK
    dataset = ray.data.from_arrow([rows.slice(start, block) for start in range(0, len(rows), block)])
    dataset.context.execution_options.preserve_order = True
    dataset.context.enable_progress_bars = False  # the stage prints its own progress line; bars redraw every batch
    return dataset.map_batches(GalleryBatcher, fn_constructor_kwargs=dict(
        prepared_dir=str(prepared_dir), source=source, **tokens), batch_size=batch_size, **actor)


BATCHES_PER_BLOCK = 8  # global batches per input block of the plan: few blocks to put, still many per epoch


def _arrow_table(columns: dict[str, np.ndarray]):
    """Numpy columns ([N] or [N, K]) -> a pyarrow table (2-D columns as Ray's tensor extension type)."""
    import pyarrow as pa
    from ray.data.extensions import ArrowTensorArray

    return pa.table({name: ArrowTensorArray.from_numpy(c) if c.ndim > 1 else pa.array(c) for name, c in columns.items()})


def iter_worker_batches(batch_size: int, device=None, dataset: str = "train", pin_memory: bool = False,
                        prefetch_batches: int = 2) -> Iterator[dict]:
    """Inside ``train_loop_per_worker``: this rank's shard as torch batches of ``batch_size`` (drop_last), on the
    worker's device (Ray Data's default), staged in pinned host memory with ``pin_memory`` (GPU workers), with
    ``prefetch_batches`` fetched ahead of the step in Ray Data's background thread. The shard is looked up now;
    Ray Data starts when the first batch is asked for."""
    import ray.train

    shard = ray.train.get_dataset_shard(dataset)
    kwargs = {"device": device} if device is not None else {}
    return iter(shard.iter_torch_batches(batch_size=batch_size, drop_last=True, pin_memory=pin_memory,
                                         prefetch_batches=prefetch_batches, **kwargs))


class FirstFetched:
    """An iterator whose first item is fetched in a background thread from construction on: a stage's input
    pipeline starts while its model is set up. Iterating waits for that item (and re-raises its error)."""

    def __init__(self, iterator: Iterator):
        import threading

        self._iterator, self._first, self._error = iterator, [], None
        self._thread = threading.Thread(target=self._fetch, name="first-batch", daemon=True)
        self._thread.start()

    def _fetch(self) -> None:
        try:
            self._first.append(next(self._iterator))
        except StopIteration:
            pass
        except BaseException as error:  # noqa: BLE001 (handed to the consumer's thread)
            self._error = error

    def __iter__(self) -> Iterator:
        self._thread.join()
        if self._error is not None:
            raise self._error
        yield from self._first
        yield from self._iterator
