"""Distributed encoding for evaluation and indexing: Ray Data ``map_batches`` over an actor pool (any number of
actors, one GPU each with ``use_gpu``). The whole gallery is encoded (never split by rank); queries are split
over the actors. With one actor asked for and at most ``EncodeOptions.in_process_max_rows`` rows, the same encoder
runs in the calling process instead: a pool's actor costs a process, its imports and a model load (5-10 s on 2
cores), more than a small split's whole encoding.

``encode_gallery`` -> ``GalleryIndex`` of the unified embedding ``[t_gm ; t_di] / sqrt 2`` [N, Nq, 2D], once per
image, reused by every fusion rule. ``encode_queries`` -> ``QueryFeatures``: both branches' composed queries,
the text-only feature and the model's own compositor output, per query.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import torch

from detailfusion.library.data.images import jpeg_thumbnail
from detailfusion.library.data.manifest import read_manifest
from detailfusion.library.data.schema import pixels_from_bytes
from detailfusion.library.errors import DataError
from detailfusion.library.index.exact import GalleryIndex
from detailfusion.library.model.inference import QueryFeatures, embed_gallery, embed_queries
from detailfusion.library.registry import extensions, install
from detailfusion.platform.data.training_input import PIXELS, load_image_store


@dataclass(frozen=True)
class EncodeOptions:
    actors: int = 1  # actor-pool size
    cpus_per_actor: float = 1.0
    use_gpu: bool = False  # one GPU per actor
    batch_size: int = 64  # images or queries per batch
    in_process_max_rows: int = 10_000  # with actors == 1, splits up to this many rows are encoded here (0: never)

    def in_process(self, rows: int) -> bool:
        return self.actors == 1 and rows <= self.in_process_max_rows


def _load(model_dir: str, use_gpu: bool, shipped: list | None = None):
    """The model of ``model_dir`` in eval mode on this actor's device; ``shipped``: the driver's registry
    extensions (a compositor or fusion rule registered outside the package), installed first."""
    from detailfusion.library.model import load_model

    install(shipped)
    model, tokenizer = load_model(model_dir)
    device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return model.to(device=device, dtype=dtype).eval(), tokenizer, device


class GalleryEncoder:
    """Actor: {image_id, pixels (one bytes value per uint8 [S, S, 3] image)} -> {image_id, embedding float32
    [B, Nq, 2D], thumbnail JPEG, node_ip (where it was encoded)}."""

    def __init__(self, model_dir: str, use_gpu: bool, shipped: list | None = None):
        import ray

        self.model, _, self.device = _load(model_dir, use_gpu, shipped)
        self.node_ip = ray.util.get_node_ip_address()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        array = pixels_from_bytes(batch["pixels"])  # uint8 [B, S, S, 3]
        embedding = embed_gallery(self.model, torch.from_numpy(array).to(self.device, non_blocking=True))
        thumbnails = np.array([jpeg_thumbnail(image) for image in array], dtype=object)
        return {"image_id": batch["image_id"], "embedding": embedding.float().cpu().numpy(), "thumbnail": thumbnails,
                "node_ip": np.array([self.node_ip] * len(array))}


class QueryEncoder:
    """Actor: {sample_id, reference_id, text} -> {sample_id, q_gm, q_di, text_gm [B, D], unified [B, 2D],
    weights [B, 2] (NaN when the compositor has none)}. Holds the split's reference images (uint8)."""

    def __init__(self, model_dir: str, prepared_dir: str, use_gpu: bool, shipped: list | None = None):
        self.model, self.tokenizer, self.device = _load(model_dir, use_gpu, shipped)
        self.position, self.images = load_image_store(prepared_dir, PIXELS)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = [self.position[r] for r in batch["reference_id"]]
        pixels = torch.from_numpy(self.images[rows]).to(self.device, non_blocking=True)
        features = embed_queries(self.model, self.tokenizer, pixels, [str(t) for t in batch["text"]])
        return {"sample_id": batch["sample_id"], **{name: value.numpy() for name, value in features.items()}}


def _pool_kwargs(options: EncodeOptions) -> dict:
    from ray.data import ActorPoolStrategy

    # actors over as many nodes as the cluster has: Ray Data places them with its context's scheduling strategy,
    # "SPREAD" by default (DataContext.scheduling_strategy; passing it here is ray_remote_args, deprecated in 2.60)
    return dict(compute=ActorPoolStrategy(size=options.actors), num_cpus=options.cpus_per_actor,
                num_gpus=1 if options.use_gpu else 0, batch_size=options.batch_size, batch_format="numpy")


def _over_the_pool(dataset, options: EncodeOptions):
    """Blocks of at most one batch (a block is never split between actors: a one-file gallery would otherwise go to
    one actor), and the work held back until the whole pool is up (else the first actor ready takes it all)."""
    spread = dataset.repartition(target_num_rows_per_block=options.batch_size)
    spread.context.wait_for_min_actors_s = 600  # (each dataset holds its own context) fails when the pool cannot start
    return spread


def _batches_here(encoder, table, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """``encoder`` over a pyarrow table's rows in batches of ``batch_size`` (numpy columns, as Ray Data gives an
    actor), in this process: its output batches."""
    for start in range(0, table.num_rows, batch_size):
        part = table.slice(start, batch_size)
        yield encoder({name: part.column(name).to_numpy(zero_copy_only=False) for name in part.column_names})


def _concatenated(batches) -> dict[str, np.ndarray]:
    """Batches of numpy columns -> the concatenated columns ({} for none)."""
    columns: dict[str, list] = {}
    for batch in batches:
        for name, values in batch.items():
            columns.setdefault(name, []).append(values)
    return {name: np.concatenate(parts) for name, parts in columns.items()}


def _collect(dataset, key: str) -> dict[str, np.ndarray]:
    """All rows of a small result dataset as concatenated numpy columns."""
    columns = _concatenated(dataset.iter_batches(batch_size=None, batch_format="numpy"))
    return columns if key in columns else {}


def gallery_order(prepared_dir: str | Path) -> tuple[list[str], list[str | None]]:
    """A prepared gallery-layout split's image ids in gallery.parquet order (each once) and their locations."""
    manifest = read_manifest(prepared_dir)
    if manifest.layout != "gallery":
        raise DataError(f"{prepared_dir}: a {manifest.dataset} split has no gallery to encode")
    gallery = pq.read_table(Path(prepared_dir) / "gallery.parquet", columns=["image_id", "location"])
    location = dict(zip(gallery.column("image_id").to_pylist(), gallery.column("location").to_pylist()))
    return list(location), list(location.values())


def stream_gallery(prepared_dir: str | Path, model_dir: str | Path, options: EncodeOptions = EncodeOptions(),
                   image_ids: list[str] | None = None) -> Iterator[dict[str, np.ndarray]]:
    """The split's decoded images (only ``image_ids`` when given), encoded: batches {image_id, embedding float32
    [B, Nq, 2D], thumbnail JPEG, node_ip} in the order they come off the encoder (in this process for a small split
    and one actor, else the Ray Data pool, streamed: only batches in flight are held)."""
    import ray

    path, columns = Path(prepared_dir) / "images", ["image_id", "pixels"]
    rows = len(image_ids) if image_ids is not None else ds.dataset(path, format="parquet").count_rows()
    if options.in_process(rows):
        wanted = None if image_ids is None else pc.field("image_id").isin(image_ids)
        table = pq.read_table(path, columns=columns, filters=wanted)
        yield from _batches_here(GalleryEncoder(str(model_dir), options.use_gpu), table, options.batch_size)
        return
    images = ray.data.read_parquet(str(path)).select_columns(columns)
    if image_ids is not None:
        from ray.data.expressions import col

        images = images.filter(expr=col("image_id").is_in(list(image_ids)))
    encoder = dict(fn_constructor_args=(str(model_dir), options.use_gpu, extensions()), **_pool_kwargs(options))
    encoded = _over_the_pool(images, options).map_batches(GalleryEncoder, **encoder)
    yield from encoded.iter_batches(batch_size=None, batch_format="numpy")


def encode_gallery(prepared_dir: str | Path, model_dir: str | Path, fingerprint: str,
                   options: EncodeOptions = EncodeOptions()) -> GalleryIndex:
    """Every decoded image of a prepared gallery-layout split -> a ``GalleryIndex`` (rows in gallery.parquet order)."""
    from detailfusion.library.model import DetailFusionConfig

    manifest = read_manifest(prepared_dir)
    ids, locations = gallery_order(prepared_dir)
    encoded = _concatenated(stream_gallery(prepared_dir, model_dir, options))
    if not len(encoded):
        raise DataError(f"{prepared_dir}: no images to encode")
    row = {str(name): i for i, name in enumerate(encoded["image_id"])}
    nodes, counts = np.unique(encoded["node_ip"].astype(str), return_counts=True)
    order = [row[name] for name in ids]
    return GalleryIndex(
        embeddings=torch.from_numpy(encoded["embedding"][order]), image_ids=ids, model_fingerprint=fingerprint,
        fusion_score=DetailFusionConfig.from_pretrained(str(model_dir)).fusion_score,
        locations=locations, thumbnails=[bytes(encoded["thumbnail"][i]) for i in order],
        source=gallery_source(prepared_dir, manifest, {str(n): int(c) for n, c in zip(nodes, counts)}),
    )


def gallery_source(prepared_dir: str | Path, manifest, encoded_on: dict[str, int]) -> dict:
    """An index's ``source``: the split it was encoded from and where (node IP -> images encoded there)."""
    return {"dataset": manifest.dataset, "split": manifest.split, "prepared": str(prepared_dir),
            "source": manifest.source, "config_hash": manifest.config_hash, "encoded_on": encoded_on}


def encode_queries(prepared_dir: str | Path, model_dir: str | Path, triplets,
                   options: EncodeOptions = EncodeOptions()) -> QueryFeatures:
    """The queries of ``triplets`` (a pyarrow table of canonical rows) -> ``QueryFeatures`` in table order."""
    import ray

    columns = triplets.select(["sample_id", "reference_id", "text"])
    if options.in_process(columns.num_rows):
        encoder = QueryEncoder(str(model_dir), str(prepared_dir), options.use_gpu)
        encoded = _concatenated(_batches_here(encoder, columns, options.batch_size))
    else:
        rows = ray.data.from_arrow(columns)
        encoder = dict(fn_constructor_args=(str(model_dir), str(prepared_dir), options.use_gpu, extensions()),
                       **_pool_kwargs(options))
        encoded = _collect(_over_the_pool(rows, options).map_batches(QueryEncoder, **encoder), "unified")
    wanted = triplets.column("sample_id").to_pylist()
    position = {str(s): i for i, s in enumerate(encoded["sample_id"])}
    order = [position[s] for s in wanted]
    take = lambda name: torch.from_numpy(encoded[name][order])  # noqa: E731
    return QueryFeatures(wanted, take("q_gm"), take("q_di"), take("text_gm"), take("unified"), take("weights"))
