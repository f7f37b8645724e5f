"""The ``index`` job's compressed build (``index_backend.kind = ivfpq``, one shard or many) without the gallery
ever whole in memory:

1. **Codec.** The images of a seeded sample (``compressed_index.sample_rows``: enough whole images for
   ``ivfpq.train_sample`` token vectors) are encoded and train one ``Codec`` (IVF centroids, PQ codebooks), shared
   by every shard.
2. **Streaming.** The whole gallery streams through the encoder (the Ray Data actor pool, or this process for a
   small split, as ``evaluate`` encodes); each encoded batch goes to the builder actor of its shard (an
   ``IndexWriter`` each, ``index_backend.build_cpus`` CPUs), which codes and stores it while later batches encode.
   The driver holds only the batches in flight.
3. **Finish.** Every builder checks it got all its rows and writes its shard (FAISS files, store, images.parquet,
   index.json); with several shards the driver then writes the gallery's images.parquet (the shards' one after
   another) and the sharded index.json, last.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from detailfusion.library.config import IndexBackendConfig
from detailfusion.library.data.manifest import read_manifest
from detailfusion.library.errors import ConfigError, DataError
from detailfusion.library.index.compressed import Codec, IndexWriter, sample_rows, store_file_bytes
from detailfusion.library.index.exact import IMAGES_FILE, concat_images
from detailfusion.library.index.sharded import shard_bounds, shard_name
from detailfusion.library.index.store import clear_index, open_index, write_sharded_meta
from detailfusion.platform.eval.encode import EncodeOptions, gallery_order, gallery_source, stream_gallery

READ_CPUS = 1  # a Ray Data read task's CPUs, needed beside the builders and the encoder pool
IN_FLIGHT_PER_SHARD = 2  # batches sent to a builder and not yet coded, before the driver waits


class ShardBuilder:
    """Ray actor: one shard's ``IndexWriter`` and the thumbnails of its rows."""

    def __init__(self, directory: str, codec: Codec, images: int, model_fingerprint: str, threads: int):
        import faiss

        faiss.omp_set_num_threads(max(1, threads))
        self.writer = IndexWriter(directory, codec, images, model_fingerprint)
        self.thumbnails: list[bytes | None] = [None] * images

    def add(self, rows: np.ndarray, embeddings: np.ndarray, thumbnails: list[bytes]) -> int:
        self.writer.add(rows, embeddings)
        for row, thumbnail in zip(rows.tolist(), thumbnails):
            self.thumbnails[row] = thumbnail
        return len(rows)

    def finish(self, image_ids: list[str], locations: list[str | None], source: dict) -> dict:
        directory = self.writer.finish(image_ids, locations, self.thumbnails, source)  # not loaded again here
        return {"memory_bytes": self.writer.memory_bytes(), "store_bytes": store_file_bytes(directory),
                "nlist": self.writer.codec.config.nlist}


def build_compressed(prepared: str | Path, model_dir: str | Path, fingerprint: str, fusion_score: str,
                     tokens: int, directory: str | Path, backend: IndexBackendConfig, options: EncodeOptions):
    """Encode the prepared split's gallery and write it as a compressed index of ``backend.shards`` shards in
    ``directory`` (replacing any index there); returns the open index. ``tokens``: the model's Nq."""
    import ray

    start = time.perf_counter()
    ids, locations = gallery_order(prepared)
    if not ids:
        raise DataError(f"{prepared}: no images to encode")
    bounds = shard_bounds(len(ids), backend.shards)
    _check_cpus(backend, options)
    directory = clear_index(directory, backend.kind)
    row_of = {name: row for row, name in enumerate(ids)}

    sample_ids = [ids[r] for r in sample_rows(len(ids), tokens, backend.ivfpq)]
    sample = _embeddings(stream_gallery(prepared, model_dir, options, sample_ids))
    largest = max(end - begin for begin, end in bounds)
    codec = Codec.train(sample, largest * tokens, backend.ivfpq, fusion_score)
    print(f"index: codec trained on {len(sample)} images ({len(sample) * tokens} token vectors, nlist "
          f"{codec.config.nlist}, m {codec.config.m}) in {time.perf_counter() - start:.1f} s", flush=True)
    del sample

    sharded = len(bounds) > 1
    builder = ray.remote(num_cpus=backend.build_cpus)(ShardBuilder)
    codec_ref = ray.put(codec)
    threads = max(1, int(backend.build_cpus))
    builders = [builder.remote(str(directory / shard_name(s) if sharded else directory), codec_ref, end - begin,
                               fingerprint, threads) for s, (begin, end) in enumerate(bounds)]
    offsets = np.array([begin for begin, _ in bounds])
    pending, encoded_on, done, report = [], {}, 0, time.perf_counter()
    for batch in stream_gallery(prepared, model_dir, options):
        rows = np.array([row_of.get(str(name), -1) for name in batch["image_id"]])  # -1: not a gallery image
        shard = np.where(rows >= 0, np.searchsorted(offsets, rows, side="right") - 1, -1)
        for s in np.unique(shard[shard >= 0]):
            mine = shard == s
            pending.append(builders[s].add.remote(rows[mine] - offsets[s], batch["embedding"][mine],
                                                  [bytes(t) for t in batch["thumbnail"][mine]]))
        for ip in batch["node_ip"].astype(str):
            encoded_on[ip] = encoded_on.get(ip, 0) + 1
        if len(pending) > IN_FLIGHT_PER_SHARD * len(builders):
            ready, pending = ray.wait(pending, num_returns=len(pending) - IN_FLIGHT_PER_SHARD * len(builders))
            done += sum(ray.get(ready))  # a builder's error (e.g. a row twice) surfaces here
        if time.perf_counter() - report > 30:
            print(f"index: {done:,} of {len(ids):,} images coded", flush=True)
            report = time.perf_counter()
    ray.get(pending)

    source = gallery_source(prepared, read_manifest(prepared), encoded_on)
    sizes = ray.get([b.finish.remote(ids[begin:end], locations[begin:end],
                                     {**source, "rows": [begin, end]} if sharded else source)
                     for b, (begin, end) in zip(builders, bounds)])
    if sharded:
        concat_images([directory / shard_name(s) / IMAGES_FILE for s in range(len(bounds))], directory / IMAGES_FILE)
        write_sharded_meta(directory, backend.kind, bounds, fingerprint, fusion_score, source)
    seconds = time.perf_counter() - start
    ram, disk = sum(s["memory_bytes"] for s in sizes), sum(s["store_bytes"] for s in sizes)
    print(f"index: {len(ids):,} images encoded and compressed into {len(bounds)} shard(s) in {seconds:.1f} s "
          f"({len(ids) / seconds:.0f} images/s; nlist {sizes[0]['nlist']}): {ram / len(ids):.0f} B of RAM and "
          f"{disk / len(ids):.0f} B of store per image -> {directory}", flush=True)
    return open_index(directory, fingerprint)


def _embeddings(batches) -> np.ndarray:
    """The embeddings [N, Nq, 2D] of encoded batches, concatenated (their order does not matter to a codec)."""
    parts = [batch["embedding"] for batch in batches]
    if not parts:
        raise DataError("no images encoded for the codec's sample")
    return np.concatenate(parts)


def _check_cpus(backend: IndexBackendConfig, options: EncodeOptions) -> None:
    """Refuse (ConfigError) builders, encoders and a read task that the Ray cluster's CPUs cannot hold at once: the
    job would wait for them forever."""
    import ray

    cpus = ray.cluster_resources().get("CPU", 0)
    needed = backend.shards * backend.build_cpus + options.actors * options.cpus_per_actor + READ_CPUS
    if needed > cpus:
        raise ConfigError(f"index_backend.shards={backend.shards} builders x index_backend.build_cpus="
                          f"{backend.build_cpus} + encoder_actors={options.actors} x cpus_per_actor="
                          f"{options.cpus_per_actor} + {READ_CPUS} for Ray Data's reads need {needed:g} CPUs at "
                          f"once; the Ray cluster has {cpus:g}: lower build_cpus (fractions work) or the shards")

