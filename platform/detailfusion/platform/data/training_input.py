"""Training input: a prepared split -> each rank's fixed-shape batches.

Gallery splits (CIRR, FashionIQ): ``gallery_input(prepared_dir, tokenizer, max_text_length, epochs=, seed=,
batch_size=)`` on the driver draws every epoch's rows (``epoch_plan``: a fresh seeded shuffle, text variant, subset
negatives), tokenises each text once, and puts the plan, the token table and the split's image store (uint8 pixels,
or frozen-ViT features when the cache exists and ``use_features``) in Ray's object store once; each rank maps them
(zero-copy on its node) and gathers its own micro-batches (``GalleryInput.micro_batches``), so no actor sits between
the store and the step and nothing is copied per batch through the object store. Inline splits (IPr2Pr: each row
holds its two images) small enough to hold (``inline_input``) go the same way, their reference and target images
forming the store. Larger inline splits: ``training_dataset`` streams the shards with Ray Data once per epoch, an
actor tokenises them, and ``iter_worker_batches(batch_size)`` iterates ``ray.train.get_dataset_shard("train")``
with ``drop_last=True`` so every rank runs the same number of steps.

Batch columns: input_ids, attention_mask [B, L] int64; sample_key [B] int64 (stable hash of sample_id); a gallery
split's also target_row [B] int64 (the target's row in the image store: names it);
reference / target: pixels uint8 [B, S, S, 3] or features float16 [B, T, W]; ``source`` says which;
with ``subset_negatives=K``: subset [B, K, ...] images of K members of the query's near-duplicate set (CIRR
``img_set``) other than its reference and target, drawn anew every epoch (the reference fills in when a set
has fewer than K others).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow.parquet as pq

from detailfusion.library.data.manifest import Manifest, read_manifest
from detailfusion.library.data.schema import pixels_from_bytes
from detailfusion.library.errors import DataError

FEATURES, PIXELS = "features", "pixels"


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
    """Ray Data actor for the inline layout (IPr2Pr): triplet rows with their images -> tokenised text + images.
    ``captions``: tokenise the images' captions instead of the edit text (stage 0): input_ids / attention_mask the
    reference's, target_input_ids / target_attention_mask the target's."""

    def __init__(self, tokenizer, max_text_length: int, source: str, seed: int = 0, captions: bool = False):
        self.tokenizer, self.max_text_length, self.source = tokenizer, max_text_length, source
        self.rng, self.captions = np.random.default_rng(seed), captions

    def _tokens(self, texts, prefix: str = "") -> dict[str, np.ndarray]:
        tokens = self.tokenizer([str(t) for t in texts], padding="max_length", truncation=True,
                                max_length=self.max_text_length, return_tensors="np")
        return {f"{prefix}{k}": tokens[k].astype(np.int64) for k in ("input_ids", "attention_mask")}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.captions:
            text = {**self._tokens(batch["reference_caption"]), **self._tokens(batch["target_caption"], "target_")}
        else:
            text = self._tokens([self.rng.choice(list(v)) for v in batch["text_variants"]])
        suffix = "features" if self.source == FEATURES else "pixels"
        reference, target = batch[f"reference_{suffix}"], batch[f"target_{suffix}"]
        if self.source != FEATURES:  # one bytes value per image -> uint8 [B, S, S, 3]
            reference, target = pixels_from_bytes(reference), pixels_from_bytes(target)
        return {**text, "sample_key": np.array([sample_key(s) for s in batch["sample_id"]], dtype=np.int64),
                "reference": reference, "target": target}


@dataclass(frozen=True)
class GalleryInput:
    """A gallery split's whole training input in Ray's object store (built by ``gallery_input`` on the driver).

    ``plan``: ObjectRef of the plan columns (``epoch_plan``, ``rows`` rows: every epoch's rows in order);
    ``tokens``: ObjectRef of the token table; ``store``: ObjectRef of the image store [N, ...]; ``source``: PIXELS or
    FEATURES. Picklable: it travels to the Train workers in the loop config.
    """

    plan: Any
    tokens: Any
    store: Any
    source: str
    rows: int
    epoch_rows: int  # rows of one epoch (whole global batches)

    def micro_batches(self, rank: int, world_size: int, size: int, start: int = 0) -> Iterator[dict[str, np.ndarray]]:
        """This rank's micro-batches of ``size`` rows, from micro-batch ``start`` on: micro-batch ``k`` of rank ``r``
        is plan rows ``[(k * world_size + r) * size, ... + size)``, so the ranks' k-th micro-batches together are
        ``world_size * size`` consecutive plan rows (one global batch when ``grad_accum`` is 1), disjoint across ranks.
        Only whole micro-batches of every rank are yielded (the plan holds whole global batches)."""
        import ray

        plan, tokens, store = ray.get([self.plan, self.tokens, self.store])  # zero-copy views of the node's store
        for k in range(start, self.rows // (world_size * size)):
            rows = slice((k * world_size + rank) * size, (k * world_size + rank + 1) * size)
            text = plan["text_row"][rows]
            batch = {"input_ids": tokens["input_ids"][text], "attention_mask": tokens["attention_mask"][text],
                     "sample_key": plan["sample_key"][rows], "reference": store[plan["reference_row"][rows]],
                     "target": store[plan["target_row"][rows]], "target_row": plan["target_row"][rows]}
            if "subset_rows" in plan:
                batch["subset"] = store[plan["subset_rows"][rows]]
            if "target_text_row" in plan:  # stage 0 on an inline split: the target image's caption
                target_text = plan["target_text_row"][rows]
                batch["target_input_ids"] = tokens["input_ids"][target_text]
                batch["target_attention_mask"] = tokens["attention_mask"][target_text]
            yield batch


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


def _source(prepared_dir: str | Path, manifest: Manifest, use_features: bool, vision_fingerprint: str | None) -> str:
    """PIXELS, or FEATURES when the split has a cache and ``use_features``; a cache of another ViT is refused."""
    cache = manifest.features
    source = FEATURES if use_features and cache else PIXELS
    if source == FEATURES and vision_fingerprint and cache["fingerprint"] != vision_fingerprint:
        raise DataError(
            f"{prepared_dir}: its feature cache was made by a vision encoder with fingerprint {cache['fingerprint']}, "
            f"the model has {vision_fingerprint}; rebuild the cache or train without it (use_features=false)"
        )
    return source


def holdout_groups(triplets, source: str | Path | None = None, split: str | None = None) -> list[str]:
    """Each row's holdout group [N]: rows that share one are held out together, so stage 3 never trains on a scene
    stage 2 fitted. The query's scene root where the source's caption records carry one (``read_query_tags(source,
    split)``: the synthetic benchmark), else its img_set (its sorted ``subset_ids``: CIRR), else its sample id
    (FashionIQ, IPr2Pr). ``source`` / ``split``: the root and split the split was prepared from (its Manifest)."""
    from detailfusion.library.data.query_tags import read_query_tags

    tags = read_query_tags(source, split) if source is not None and split is not None else {}
    ids = triplets.column("sample_id").to_pylist()
    members = (triplets.column("subset_ids").to_pylist() if "subset_ids" in triplets.column_names
               else [None] * len(ids))
    groups = []
    for sample_id, subset in zip(ids, members):
        root = tags[sample_id].scene_root if sample_id in tags else None
        groups.append(f"root:{root}" if root is not None else
                      f"img_set:{'|'.join(sorted(subset))}" if subset else f"sample:{sample_id}")
    return groups


def holdout_mask(groups: list[str], fraction: float) -> np.ndarray:
    """[N] bool, True for the rows held out: a stable ``fraction`` of the groups (``holdout_groups``) by a hash of
    each group key, so a group is never split between fit and holdout (the same rows in every stage, run and
    seed). The share of rows is ``fraction`` only on average over groups."""
    return np.array([sample_key(g) % 10_000 < fraction * 10_000 for g in groups], dtype=bool)


def gallery_input(prepared_dir: str | Path, tokenizer, max_text_length: int, use_features: bool = True,
                  vision_fingerprint: str | None = None, subset_negatives: int = 0, epochs: int = 1, seed: int = 0,
                  batch_size: int = 32, holdout: tuple[str, float] | None = None) -> GalleryInput:
    """A gallery split's (CIRR, FashionIQ) training input for ``epochs`` epochs, each a fresh seeded shuffle cut to
    whole global batches of ``batch_size`` (``epoch_plan``), put in the object store (rows without a target are
    refused). ``use_features``: read the frozen-ViT cache when the split has one; ``vision_fingerprint`` (of the model
    about to train) must then match the cache's. ``subset_negatives``: K near-duplicate images per row.
    ``holdout``: ("fit" | "holdout", fraction): only the rows outside / inside ``holdout_mask(fraction)`` over the
    rows' ``holdout_groups`` (scene root, else img_set, else sample id)."""
    import ray

    manifest = read_manifest(prepared_dir)
    if manifest.layout != "gallery":
        raise ValueError(f"{prepared_dir}: {manifest.dataset} has inline images, no gallery: use training_dataset")
    source = _source(prepared_dir, manifest, use_features, vision_fingerprint)
    triplets = pq.read_table(Path(prepared_dir) / "triplets")
    if holdout is not None and holdout[1] > 0:
        held = holdout_mask(holdout_groups(triplets, manifest.source, manifest.split), holdout[1])
        triplets = triplets.filter(held if holdout[0] == "holdout" else ~held)
    unlabelled = triplets.column("target_id").null_count
    if unlabelled:
        raise DataError(f"{prepared_dir}: {unlabelled} triplets have no target (a test split?); cannot train on it")
    rows_per_epoch = len(triplets) // batch_size * batch_size
    if not rows_per_epoch:
        raise DataError(f"{prepared_dir}: {len(triplets)} triplets make no global batch of {batch_size}")
    index, store = load_image_store(prepared_dir, source)
    missing = [sample for sample, ref, tgt in zip(*(triplets.column(c).to_pylist() for c in
                                                      ("sample_id", "reference_id", "target_id")))
               if ref not in index or tgt not in index]
    if missing:
        raise DataError(f"{prepared_dir}: {len(missing)} triplets name images missing from its image store "
                         f"(e.g. {', '.join(missing[:3])}); run `detailfusion prepare` for this split again")
    plan, tokens = epoch_plan(triplets, index, tokenizer, max_text_length, epochs, rows_per_epoch, seed,
                              subset_negatives)
    return GalleryInput(plan=ray.put(plan), tokens=ray.put(tokens), store=ray.put(store), source=source,
                        rows=len(plan["sample_key"]), epoch_rows=rows_per_epoch)


def inline_bytes(prepared_dir: str | Path, use_features: bool = True) -> int:
    """On-disk size of the rows an inline split trains on (its triplets, or its feature cache when used), bytes."""
    manifest = read_manifest(prepared_dir)
    folder = "features" if use_features and manifest.features else "triplets"
    return sum(f.stat().st_size for f in (Path(prepared_dir) / folder).rglob("*.parquet"))


def inline_input(prepared_dir: str | Path, tokenizer, max_text_length: int, use_features: bool = True,
                 vision_fingerprint: str | None = None, epochs: int = 1, seed: int = 0, batch_size: int = 32,
                 captions: bool = False) -> GalleryInput:
    """A small inline split (IPr2Pr) held whole like a gallery split: the image store is every row's reference
    image then every row's target image ([2N, ...]), and ``epoch_plan`` draws each epoch's fresh seeded order and
    text variant. ``captions`` (stage 0): the reference's caption is the text, and the plan's ``target_text_row``
    points at the target's (batches then carry target_input_ids / target_attention_mask). Arguments as in
    ``gallery_input``; holding it costs about the split's size on disk (``inline_bytes``) in the object store."""
    import pyarrow as pa
    import ray

    manifest = read_manifest(prepared_dir)
    if manifest.layout == "gallery":
        raise ValueError(f"{prepared_dir}: {manifest.dataset} is a gallery split: use gallery_input")
    source = _source(prepared_dir, manifest, use_features, vision_fingerprint)
    table = pq.read_table(Path(prepared_dir) / ("features" if source == FEATURES else "triplets"))
    rows = len(table)
    rows_per_epoch = rows // batch_size * batch_size
    if not rows_per_epoch:
        raise DataError(f"{prepared_dir}: {rows} rows make no global batch of {batch_size}")
    if source == FEATURES:
        images = [np.asarray(table.column(f"{side}_features").combine_chunks().to_numpy()) for side in ("reference", "target")]
    else:
        images = [pixels_from_bytes(table.column(f"{side}_pixels")) for side in ("reference", "target")]
    store = np.concatenate(images)
    texts = ([[c] for c in table.column("reference_caption").to_pylist()] if captions
             else table.column("text_variants").to_pylist())
    rows_as_triplets = pa.table({"sample_id": table.column("sample_id"), "text_variants": texts,
                                 "reference_id": [f"r{i}" for i in range(rows)],
                                 "target_id": [f"t{i}" for i in range(rows)]})
    index = {**{f"r{i}": i for i in range(rows)}, **{f"t{i}": rows + i for i in range(rows)}}
    plan, tokens = epoch_plan(rows_as_triplets, index, tokenizer, max_text_length, epochs, rows_per_epoch, seed)
    if captions:
        target = tokenizer([str(c) for c in table.column("target_caption").to_pylist()], padding="max_length",
                           truncation=True, max_length=max_text_length, return_tensors="np")
        plan["target_text_row"] = len(tokens["input_ids"]) + plan["reference_row"]  # row i's target caption
        tokens = {k: np.concatenate([tokens[k], target[k].astype(np.int64)]) for k in tokens}
    return GalleryInput(plan=ray.put(plan), tokens=ray.put(tokens), store=ray.put(store), source=source,
                        rows=len(plan["sample_key"]), epoch_rows=rows_per_epoch)


def training_dataset(prepared_dir: str | Path, tokenizer, max_text_length: int, use_features: bool = True,
                     vision_fingerprint: str | None = None, actor_cpus: float = 1.0, seed: int = 0,
                     batch_size: int = 32, captions: bool = False):
    """The Ray Dataset of an inline split (IPr2Pr) for ``TorchTrainer(datasets={"train": ...})``: one epoch per
    iteration, streamed from the shards in file order, tokenised by one actor of ``actor_cpus`` CPUs (fractional on
    small machines, where whole CPUs would starve the Train workers). ``use_features``/``vision_fingerprint``: as
    in ``gallery_input``; ``captions``: batches of the images' captions (stage 0, ``TripletBatcher``)."""
    import ray
    from ray.data import ActorPoolStrategy

    manifest = read_manifest(prepared_dir)
    if manifest.layout == "gallery":
        raise ValueError(f"{prepared_dir}: {manifest.dataset} is a gallery split: use gallery_input")
    source = _source(prepared_dir, manifest, use_features, vision_fingerprint)
    rows_dir = Path(prepared_dir) / ("features" if source == FEATURES else "triplets")
    dataset = ray.data.read_parquet(str(rows_dir), num_cpus=actor_cpus)
    dataset.context.enable_progress_bars = False  # the stage prints its own progress line; bars redraw every batch
    return dataset.map_batches(TripletBatcher, fn_constructor_kwargs=dict(
        tokenizer=tokenizer, max_text_length=max_text_length, source=source, seed=seed, captions=captions),
        batch_size=batch_size, compute=ActorPoolStrategy(size=1), num_cpus=actor_cpus, batch_format="numpy")


def iter_worker_batches(batch_size: int, device=None, dataset: str = "train", pin_memory: bool = False,
                        prefetch_batches: int = 2, shuffle_rows: int = 0, shuffle_seed: int | None = None) -> Iterator[dict]:
    """Inside ``train_loop_per_worker``: one epoch of this rank's shard as torch batches of ``batch_size``
    (drop_last), on the worker's device (Ray Data's default), staged in pinned host memory with ``pin_memory`` (GPU
    workers), with ``prefetch_batches`` fetched ahead of the step in Ray Data's background thread; ``shuffle_rows``:
    a local shuffle buffer of that many rows, seeded by ``shuffle_seed`` (a fresh order per epoch when the caller
    seeds by epoch). The shard is looked up now; Ray Data starts when the first batch is asked for."""
    import ray.train

    shard = ray.train.get_dataset_shard(dataset)
    kwargs = {"device": device} if device is not None else {}
    if shuffle_rows:
        kwargs.update(local_shuffle_buffer_size=shuffle_rows, local_shuffle_seed=shuffle_seed)
    return iter(shard.iter_torch_batches(batch_size=batch_size, drop_last=True, pin_memory=pin_memory,
                                         prefetch_batches=prefetch_batches, **kwargs))


class Prefetched:
    """An iterator read ahead by a background thread from construction on: up to ``depth`` items wait in a queue,
    so a stage's input starts while its model is set up and each batch is gathered while the previous one trains.
    Iterating re-raises the producer's error. The producer must not run torch's parallel kernels (a second
    OpenMP thread team beside the training thread's slows both on a small machine): numpy gathers only."""

    _END = object()

    def __init__(self, iterator: Iterator, depth: int = 2):
        import queue
        import threading

        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._produce, args=(iterator,), name="input-prefetch", daemon=True)
        self._thread.start()

    def _produce(self, iterator: Iterator) -> None:
        try:
            for item in iterator:
                self._queue.put(item)
        except BaseException as error:  # noqa: BLE001 (handed to the consumer's thread)
            self._error = error
        self._queue.put(self._END)

    def __iter__(self) -> Iterator:
        while (item := self._queue.get()) is not self._END:
            yield item
        if self._error is not None:
            raise self._error
