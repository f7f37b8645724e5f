"""A gallery index split into shards: shard s holds the contiguous gallery rows ``[offsets[s], offsets[s + 1])`` as a
whole index of either backend (exact or compressed) in ``shard-<s>/``. A query is searched in every shard and the
shards' top-k lists are merged (``merge_top_k``). That is the answer of one index over the whole gallery: an image's
fused score depends on that image alone, and ties go to the lower gallery row in both. Serving fans a query out to
one deployment per shard and merges the same way (``serving/app.py``).

On disk: ``shard-000/`` ... (each a complete index with its own ``index.json``), ``images.parquet`` of the whole
gallery (ids, locations, thumbnails: the search page's), and ``index.json`` (backend ``sharded``, the shards'
names and offsets, the model fingerprint, the fusion score), written last.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from detailfusion.library.errors import ConfigError
from detailfusion.library.index.exact import check_fingerprint

SHARDED = "sharded"


def shard_name(shard: int) -> str:
    return f"shard-{shard:03d}"


def shard_bounds(images: int, shards: int) -> list[tuple[int, int]]:
    """``shards`` contiguous row ranges [start, end) of near-equal size covering ``images`` rows (none empty)."""
    if not 1 <= shards <= max(images, 1):
        raise ConfigError(f"index_backend.shards={shards} for a gallery of {images} images: give between 1 and "
                          f"{max(images, 1)}")
    edges = [round(s * images / shards) for s in range(shards + 1)]
    return list(zip(edges[:-1], edges[1:]))


def merge_top_k(parts: list[tuple[torch.Tensor, torch.Tensor]], k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each shard's (scores [Q, k_s], gallery rows [Q, k_s]) -> the best ``k`` over all shards: (scores [Q, k], rows
    [Q, k]) best first, equal scores by lower gallery row (``ranking.top_k``'s tie rule)."""
    scores, rows = torch.cat([s for s, _ in parts], dim=1), torch.cat([r for _, r in parts], dim=1)
    if scores.shape[1] < k:
        raise ValueError(f"the shards hold {scores.shape[1]} images, fewer than k={k}")
    by_row = torch.sort(rows, dim=1, stable=True).indices  # rows ascending, then a stable sort by score
    scores, rows = scores.gather(1, by_row), rows.gather(1, by_row)
    best = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
    return scores.gather(1, best), rows.gather(1, best)


class ShardedIndex:
    """Open shards (``GalleryIndex`` or ``CompressedIndex`` each) searched together; the ``index_store`` interface
    (``image_ids``, ``len``, ``search``, ``check_model``, ``fusion_score``)."""

    def __init__(self, shards: list, offsets: list[int], model_fingerprint: str, fusion_score: str):
        if len(offsets) != len(shards) or any(len(s) == 0 for s in shards):
            raise ValueError(f"{len(shards)} shards with offsets {offsets}: every shard needs an offset and an image")
        self.shards, self.offsets = shards, offsets
        self.model_fingerprint, self.fusion_score = model_fingerprint, fusion_score
        self.image_ids = [name for shard in shards for name in shard.image_ids]
        self._pool: ThreadPoolExecutor | None = None  # the shards' search threads, made at the first search

    def __len__(self) -> int:
        return len(self.image_ids)

    def search(self, queries: torch.Tensor, k: int, **options) -> tuple[torch.Tensor, torch.Tensor]:
        """Unified queries [Q, 2D] -> (scores [Q, k], gallery rows [Q, k]) best first, as one index would answer.
        ``options`` go to every shard's search (compressed shards: candidates, nprobe, rerank). The shards are
        searched at the same time, one thread each (FAISS and torch release the GIL), as Serve fans a query out to
        one deployment per shard: the latency is the slowest shard's plus the merge, not the sum."""
        def one(shard_offset):
            shard, offset = shard_offset
            scores, rows = shard.search(queries, min(k, len(shard)), **options)
            return scores, rows + offset

        if len(self.shards) == 1:
            return merge_top_k([one((self.shards[0], self.offsets[0]))], k)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(len(self.shards), thread_name_prefix="shard")
        return merge_top_k(list(self._pool.map(one, zip(self.shards, self.offsets))), k)

    def check_model(self, fingerprint: str, where: str = "index") -> None:
        check_fingerprint(self.model_fingerprint, fingerprint, where)


def shard_directories(directory: str | Path) -> list[Path]:
    return sorted(p for p in Path(directory).glob("shard-[0-9][0-9][0-9]") if p.is_dir())
