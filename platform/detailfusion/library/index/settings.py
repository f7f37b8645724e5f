"""The index's typed settings (YAML sections of ``EvalConfig.index_backend`` and of the serve config): how a
compressed index is built and searched, and which backend ``detailfusion index`` writes. Here, not in
``library/config.py``, so the index depends on no dataset, metric or model registry."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Literal

from detailfusion.library.errors import ConfigError

STORE_DTYPES = ("float16", "float32", "int8")  # of the compressed index's re-ranking store (int8: with a
# float32 scale per token and branch half)


@dataclass(frozen=True)
class CompressedIndexConfig:
    """The compressed index (``compressed_index.py``): how it compresses and searches; the defaults aim at BLIP-2
    scale (Nq = 32 tokens, D = 256 per branch). On ``benchmarks/catalogue.py``'s 20,000-image synthetic catalogue
    (nlist 512) they keep 0.997 of exact search's top-10, with 2.6 KiB of RAM per image; with 2,048 hits, 0.95.
    Larger catalogues need more hits for the same recall.

    nlist: IVF lists per FAISS index; None: the power of two at or below ``4 sqrt(token vectors)``, at most
        ``train_sample / 39`` (FAISS's fewest training points per centroid).
    m: PQ sub-quantizers per token vector per branch half (its code bytes at ``nbits = 8``); must divide D.
        joint_max codes the whole 2D token with ``2 m``.
    nbits: bits per sub-quantizer code.
    nprobe: IVF lists scanned per query and index (a search may override it).
    candidates: token hits kept per branch half and query (a search may override it); more: better recall, more
        images re-ranked.
    rerank: at most this many candidate images (but at least k) are re-ranked exactly: the best by the approximate
        fusion score of their hits (a search may override it); 0: every candidate.
    store_dtype: the re-ranking store's dtype: float16 (half the disk), float32 (GalleryIndex's exact values) or
        int8 (a quarter, with a float32 scale per token and branch half: a 1 M-image store that fits a 24 GB
        machine's page cache; re-ranking on the rounded values).
    train_sample: token vectors sampled (whole images) to train the IVF centroids and the PQ codebooks.
    pool: 0: every token vector is searched; P (1 <= P < Nq): each image's Nq tokens are pooled into P vectors per
        FAISS index (the means of a k-means of that image's own tokens: token pooling, as ColBERT engines do) and
        only those are searched, P/Nq of the RAM and of the hits an image takes; re-ranking still scores all Nq
        tokens from the store. ``candidates`` then counts pooled hits. The shortlist (``rerank`` below the
        candidates) then ranks images by a pooled mean, which under-scores a noisy cluster's best token: keep
        ``rerank`` high (or 0) where an image's tokens are noisy.
    seed: the training sample's and k-means' seed.
    """

    nlist: int | None = None
    m: int = 32
    nbits: int = 8
    nprobe: int = 64
    candidates: int = 8192
    rerank: int = 512
    store_dtype: str = "float16"
    train_sample: int = 262_144
    pool: int = 0
    seed: int = 0

    def __post_init__(self):
        for name in ("m", "nbits", "nprobe", "candidates", "train_sample"):
            if getattr(self, name) < 1:
                raise ConfigError(f"compressed index: {name}={getattr(self, name)} must be at least 1")
        if self.nlist is not None and self.nlist < 1:
            raise ConfigError(f"compressed index: nlist={self.nlist} must be at least 1 (or None: automatic)")
        if self.pool < 0:
            raise ConfigError(f"compressed index: pool={self.pool} must be at least 0 (0: every token vector)")
        if self.rerank < 0:
            raise ConfigError(f"compressed index: rerank={self.rerank} must be at least 0 (0: every candidate)")
        if self.nbits > 16:
            raise ConfigError(f"compressed index: nbits={self.nbits} must be at most 16")
        if self.store_dtype not in STORE_DTYPES:
            raise ConfigError(f"compressed index: store_dtype={self.store_dtype!r}; known: {', '.join(STORE_DTYPES)}")

    def resolved(self, vectors: int, width: int) -> "CompressedIndexConfig":
        """This config for ``vectors`` token vectors of ``width`` dims per FAISS index: nlist set, m checked."""
        if width % self.m:
            raise ConfigError(f"compressed index: m={self.m} does not divide the branch width D={width}")
        sample = min(self.train_sample, vectors)
        nlist = self.nlist or 2 ** int(math.log2(max(1.0, min(4 * math.sqrt(vectors), sample / 39))))
        if nlist > sample:
            raise ConfigError(f"compressed index: nlist={nlist} exceeds the {sample} training vectors (train_sample)")
        return dataclasses.replace(self, nlist=nlist)


@dataclass(frozen=True)
class IndexBackendConfig:
    """The index ``detailfusion index`` writes and ``serve`` opens (``index_store.py``). exact: every token of every
    image in float32 (``index.py``), exact search; ivfpq: FAISS IVF-PQ candidates + exact re-ranking from a float16
    store (``compressed_index.py``), set by ``ivfpq``. ``evaluate`` always ranks with the exact index."""

    kind: Literal["exact", "ivfpq"] = "exact"
    ivfpq: CompressedIndexConfig = field(default_factory=CompressedIndexConfig)
    shards: int = 1  # contiguous gallery slices, each a whole index of ``kind`` (sharded_index.py); serving runs
    # one deployment per shard and merges their top-k
    build_cpus: float = 1.0  # CPUs of each shard's builder actor (ivfpq: ``detailfusion index`` codes and stores
    # every shard in parallel while the encoder pool streams the gallery to them)

    def __post_init__(self):
        if self.shards < 1:
            raise ConfigError(f"index_backend.shards must be >= 1, got {self.shards}")
        if self.build_cpus <= 0:
            raise ConfigError(f"index_backend.build_cpus must be > 0, got {self.build_cpus}")


@dataclass(frozen=True)
class SearchSettings:
    """How an open compressed index searches, set where it is opened (``serve``'s ``search:`` section) without a
    rebuild; None: the value the index was built with (its ``CompressedIndexConfig``). An exact index has none.

    nprobe: IVF lists scanned per query and FAISS index; candidates: token hits kept per search; rerank: candidate
    images re-ranked exactly (0: every candidate). More of each: better recall, more latency.
    """

    nprobe: int | None = None
    candidates: int | None = None
    rerank: int | None = None

    def __post_init__(self):
        for name in ("nprobe", "candidates"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"search.{name}={value} must be at least 1 (or unset: the index's own)")
        if self.rerank is not None and self.rerank < 0:
            raise ConfigError(f"search.rerank={self.rerank} must be at least 0 (0: every candidate)")

    def given(self) -> dict[str, int]:
        """The settings that are set, by name."""
        return {name: value for name, value in dataclasses.asdict(self).items() if value is not None}
