"""The compressed gallery index for catalogue-scale retrieval: ``GalleryIndex.search``'s top-k (index.py) from FAISS
IVF-PQ candidate generation over the token vectors plus exact re-ranking from a memory-mapped store.

Search, for each unified query u [2D] (model/fusion.py's rules):

1. **Candidates.** ``branch_max`` searches each half of u among that half's token vectors (one IVF-PQ index per
   branch); ``joint_max`` searches the whole u among the whole token vectors (one index, twice the code bytes).
   Each search keeps its best ``candidates`` token hits (joint_max: ``2 x candidates``); token id t is image
   ``t // Nq`` (with ``pool`` = P, each image's tokens pooled into P vectors per index: ``t // P``); the candidate set is the union over the searches (branch_max: the two run at once, on two
   threads). A branch half of u that is all zeros (weight 0) gives every image the same score on that branch and
   names no candidates.
2. **Shortlist** (``rerank`` > 0): only the best ``rerank`` candidates by an approximate fusion score from their
   hits' PQ inner products go on (``CompressedIndex.shortlist``).
3. **Re-ranking.** The candidates are scored exactly by the fusion score from the re-ranking store (the unified
   embeddings [N, Nq, 2D], float16, float32 or int8 with a float32 scale per token and branch half in
   ``scales.npy``, memory-mapped), ``RERANK_CHUNK`` images at a time; the best k come back, ties by gallery order.

When every token is a hit (``nprobe = nlist``, ``candidates >= N * Nq``) and every image is re-ranked (``rerank``
0 or at least N) the answer is exactly ``GalleryIndex.search``'s on the store's values (float32 store: the
embeddings themselves). RAM (``memory_bytes``): the FAISS indexes, per token vector ``m`` code bytes (at 8 bits)
and an 8-byte id, plus centroids and codebooks; disk (``store_bytes``): the store, ``Nq x 2D x 2`` bytes per image
in float16.

On disk (``build``/``load``): ``gm.faiss`` + ``di.faiss`` (branch_max) or ``tokens.faiss`` (joint_max),
``store.npy``, ``images.parquet`` (image_id, location, thumbnail) and ``index.json`` (backend ``ivfpq``, model
fingerprint, fusion score, config, shape), written last: its presence marks a whole index. The settings,
``CompressedIndexConfig``, live in ``config.py`` (``EvalConfig.index_backend.ivfpq``).
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

from detailfusion.library.errors import ConfigError
from detailfusion.library.index.exact import (
    IMAGES_FILE,
    META_FILE,
    GalleryIndex,
    check_fingerprint,
    read_meta,
    write_images,
)
from detailfusion.library.index.settings import (  # re-exported: callers import them from here
    CompressedIndexConfig,
)
from detailfusion.library.model.fusion import DEFAULT_FUSION_RULE, check_rule, fused_scores, fusion_rule
from detailfusion.library.ranking import top_k

BACKEND, STORE_FILE, SCALES_FILE = "ivfpq", "store.npy", "scales.npy"  # scales: int8 stores only
FAISS_FILES = ("gm.faiss", "di.faiss", "tokens.faiss")  # branch_max: the first two; joint_max: the last
CHUNK_BYTES = 64 << 20  # float32 token vectors read at a time while building (bounds the build's extra memory)
RERANK_CHUNK = 128  # candidates scored at a time: their float32 tokens (8 MiB at Nq 32, 2D 512) stay in cache


def exact_search(embeddings, queries: torch.Tensor, k: int, fusion_score: str, chunk: int = 2048
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """``GalleryIndex.search`` over embeddings [N, Nq, 2D] (torch or numpy, e.g. a float16 memmap) read ``chunk``
    images at a time: (scores [Q, k], indices [Q, k]), best first, ties by gallery order."""
    running = RunningTopK(queries, k, fusion_score)
    for start in range(0, len(embeddings), chunk):
        running.add(start, _float32(embeddings, slice(start, min(start + chunk, len(embeddings)))))
    return running.result()


class RunningTopK:
    """Exact top-k of unified queries [Q, 2D] over a gallery seen in consecutive chunks of images (e.g. as they are
    made, never stored whole): ``add`` each chunk, ``result`` -> (scores [Q, k], gallery indices [Q, k]), best
    first, ties by gallery order (``GalleryIndex.search``'s answer)."""

    def __init__(self, queries: torch.Tensor, k: int, fusion_score: str):
        self.queries, self.k, self.fusion_score = queries.float(), k, fusion_score
        self.scores, self.indices = torch.zeros(len(queries), 0), torch.zeros(len(queries), 0, dtype=torch.long)

    def add(self, start: int, embeddings: torch.Tensor) -> None:
        """Gallery images ``start`` .. ``start + n - 1`` as unified embeddings [n, Nq, 2D] float32, in gallery order
        after every earlier chunk."""
        scores = torch.cat([self.scores, fused_scores(self.queries, embeddings, self.fusion_score)], dim=1)
        indices = torch.cat([self.indices, torch.arange(start, start + len(embeddings)).expand(len(scores), -1)], dim=1)
        keep = top_k(scores, min(self.k, scores.shape[1]))  # earlier images come first: the stable sort keeps ties
        self.scores, self.indices = scores.gather(1, keep), indices.gather(1, keep)

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.indices.shape[1] < self.k:
            raise ValueError(f"the gallery holds {self.indices.shape[1]} images, fewer than k={self.k}")
        return self.scores, self.indices


def _float32(embeddings, rows) -> torch.Tensor:
    """Rows (a slice or sorted indices) of embeddings [N, ...] (torch or numpy) as a float32 torch tensor."""
    if isinstance(embeddings, torch.Tensor):
        return embeddings[rows if isinstance(rows, slice) else torch.as_tensor(rows)].float()
    part = np.require(embeddings[rows], requirements="W")  # a read-only memmap's slice: copied (torch writes)
    return torch.from_numpy(part).float()  # torch's float16 -> float32 conversion is faster than numpy's


class CompressedIndex:
    """A built index, loaded: the FAISS indexes in RAM, the re-ranking store memory-mapped. Make one with ``build``
    (or ``from_gallery``), open one with ``load``."""

    def __init__(self, directory: Path, meta: dict, image_ids: list[str], locations: list[str | None]):
        import faiss

        self.directory, self.meta = directory, meta
        self.image_ids, self.locations = image_ids, locations
        self.model_fingerprint, self.fusion_score = meta["model_fingerprint"], meta["fusion_score"]
        self.config = CompressedIndexConfig(**meta["config"])
        self.store = np.load(directory / STORE_FILE, mmap_mode="r")  # [N, Nq, 2D]
        int8 = self.store.dtype == np.int8
        self.scales = np.load(directory / SCALES_FILE, mmap_mode="r") if int8 else None  # [N, Nq, 2]
        self.searchers = [faiss.read_index(str(directory / name)) for name in meta["faiss_files"]]
        self.parts = fusion_rule(self.fusion_score).parts(self.store.shape[2])  # query columns of each searcher
        self.per_image = self.config.pool or self.store.shape[1]  # FAISS vector id v: image v // per_image

    def __len__(self) -> int:
        return len(self.image_ids)

    def check_model(self, fingerprint: str, where: str = "index") -> None:
        """Refuse (``IndexMismatch``) a model other than the one that built the index."""
        check_fingerprint(self.model_fingerprint, fingerprint, where)

    # -- building ------------------------------------------------------------------------------------

    @classmethod
    def from_gallery(cls, index: GalleryIndex, directory: str | Path,
                     config: CompressedIndexConfig = CompressedIndexConfig()) -> "CompressedIndex":
        """Compress an exact ``GalleryIndex`` (its embeddings, ids, locations, thumbnails, model fingerprint, fusion
        score, source)."""
        return cls.build(index.embeddings, index.image_ids, index.model_fingerprint, directory, config,
                         fusion_score=index.fusion_score, locations=index.locations, source=index.source,
                         thumbnails=index.thumbnails)

    @classmethod
    def build(cls, embeddings, image_ids: list[str], model_fingerprint: str, directory: str | Path,
              config: CompressedIndexConfig = CompressedIndexConfig(), fusion_score: str = DEFAULT_FUSION_RULE,
              locations: list[str | None] | None = None, source: dict | None = None,
              thumbnails: list[bytes | None] | None = None) -> "CompressedIndex":
        """Build from unified embeddings [N, Nq, 2D] (torch or numpy, e.g. a memmap; any float dtype), read in chunks:
        a ``Codec`` trained on a sample of whole images, every row added by an ``IndexWriter``, then the ids (with
        their locations and JPEG thumbnails for serving, where given) and ``index.json``."""
        if len(embeddings.shape) != 3 or embeddings.shape[0] != len(image_ids) or embeddings.shape[2] % 2:
            raise ValueError(f"embeddings {tuple(embeddings.shape)} do not match {len(image_ids)} image ids "
                             "as [N, Nq, 2D]")
        images, tokens, width = (int(n) for n in embeddings.shape)
        codec = Codec.train(_float32(embeddings, sample_rows(images, tokens, config)), images * tokens, config,
                            fusion_score)
        writer = IndexWriter(directory, codec, images, model_fingerprint)
        step = max(1, CHUNK_BYTES // (tokens * width * 4))
        for start in range(0, images, step):
            rows = np.arange(start, min(start + step, images))
            writer.add(rows, _float32(embeddings, slice(rows[0], rows[-1] + 1)).numpy())
        return cls.load(writer.finish(image_ids, locations, thumbnails, source))

    @classmethod
    def load(cls, directory: str | Path, model_fingerprint: str | None = None) -> "CompressedIndex":
        """Open a built index; with ``model_fingerprint``, refuse one built by another model (``IndexMismatch``)."""
        import pyarrow.parquet as pq

        directory = Path(directory)
        meta = read_meta(directory, BACKEND)
        if model_fingerprint is not None:
            check_fingerprint(meta["model_fingerprint"], model_fingerprint, where=f"index {directory}")
        table = pq.read_table(directory / IMAGES_FILE, columns=["image_id", "location"])  # thumbnails: serving's
        return cls(directory, meta, table.column("image_id").to_pylist(), table.column("location").to_pylist())

    # -- search --------------------------------------------------------------------------------------

    def search(self, queries: torch.Tensor, k: int, candidates: int | None = None, nprobe: int | None = None,
               rerank: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Unified queries [Q, 2D] -> (scores [Q, k], gallery indices [Q, k]), best first, ties by gallery order.

        ``candidates`` (token hits per half), ``nprobe`` and ``rerank`` default to the config's. A query whose hits
        name fewer than k images searches again with hits and nprobe doubled, up to every token."""
        if len(self) < k:
            raise ValueError(f"the gallery holds {len(self)} images, fewer than k={k}")
        queries = queries.detach().float().cpu()
        hits, nprobe = candidates or self.config.candidates, nprobe or self.config.nprobe
        keep = self.config.rerank if rerank is None else rerank
        keep = max(keep, k) if keep else None
        found = self.candidates(queries, hits, nprobe, keep)
        short = [q for q, images in enumerate(found) if len(images) < k]
        total, nlist = self.store.shape[0] * self.per_image, self.config.nlist
        while short and (hits < total or nprobe < nlist):
            hits, nprobe = min(2 * hits, total), min(2 * nprobe, nlist)
            for q, images in zip(short, self.candidates(queries[short], hits, nprobe, keep)):
                found[q] = images
            short = [q for q in short if len(found[q]) < k]
        best_scores, best = torch.empty(len(queries), k), torch.empty(len(queries), k, dtype=torch.long)
        for q, images in enumerate(found):
            best_scores[q], best[q] = self.rerank(queries[q], images, k)
        return best_scores, best

    def candidates(self, queries: torch.Tensor, hits: int, nprobe: int, keep: int | None = None) -> list[np.ndarray]:
        """Unified queries [Q, 2D] -> per query, the sorted gallery indices named by the best ``hits`` token hits of
        each FAISS search (joint_max: ``2 hits``), ``nprobe`` lists scanned per search; with ``keep``, only the
        best ``keep`` of them by their hits' approximate fusion score (``shortlist``)."""
        import faiss

        hits = 2 * hits if len(self.searchers) == 1 else hits
        params = faiss.SearchParametersIVF(nprobe=min(nprobe, self.config.nlist))
        vectors = [np.ascontiguousarray(queries[:, part].numpy()) for part in self.parts]
        def search(pair):  # FAISS releases the GIL: the two branch searches run on two cores at once
            searcher, v = pair
            return searcher.search(v, min(hits, searcher.ntotal), params=params)

        pairs = list(zip(self.searchers, vectors))
        found = list(_branch_pool().map(search, pairs)) if len(pairs) > 1 else [search(pairs[0])]
        # found: (scores [Q, hits], token ids [Q, hits]) per searcher
        if len(found) == 2:  # a zero half (weight 0) scores every image alike: the other half alone names candidates
            zero = [~v.any(axis=1) for v in vectors]
            found[0][1][zero[0] & ~zero[1]] = -1
            found[1][1][zero[1] & ~zero[0]] = -1
        return [self.shortlist([(scores[q], ids[q]) for scores, ids in found], keep) for q in range(len(queries))]

    def shortlist(self, hits: list[tuple[np.ndarray, np.ndarray]], keep: int | None) -> np.ndarray:
        """One query's hits, per search (approximate scores [h] best first, token ids [h], -1: none) -> the sorted
        gallery indices of the images they name; with ``keep``, the best ``keep`` by the approximate fusion score:
        the sum over searches of the image's best hit, or the search's last hit where it has none (its bound)."""
        named = []
        for scores, ids in hits:
            scores, ids = scores[ids >= 0], ids[ids >= 0]
            images, first = np.unique(ids // self.per_image, return_index=True)
            named.append((images, scores[first], scores[-1] if len(scores) else 0.0))
        union = functools.reduce(np.union1d, [images for images, _, _ in named])
        if keep is None or len(union) <= keep:
            return union
        approximate = np.zeros(len(union), dtype=np.float32)
        for images, best, bound in named:
            part = np.full(len(union), bound, dtype=np.float32)
            part[np.searchsorted(union, images)] = best
            approximate += part
        return np.sort(union[np.argpartition(-approximate, keep)[:keep]])

    def rerank(self, query: torch.Tensor, images: np.ndarray, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One unified query [2D] and sorted candidate gallery indices [C] -> (scores [k'], indices [k']), the best
        k' = min(k, C) by the exact fusion score on the store, ties by gallery order."""
        scores = torch.cat([self.scores(query, images[start:start + RERANK_CHUNK])
                            for start in range(0, len(images), RERANK_CHUNK)])
        order = top_k(scores[None], min(k, len(images)))[0]
        return scores[order], torch.from_numpy(images)[order]

    def scores(self, query: torch.Tensor, images) -> torch.Tensor:
        """The exact fusion scores [C] of one unified query [2D] against the store's rows ``images`` (sorted indices
        or a slice). An int8 store scales each token half's dot product [C, Nq, 2] rather than its values [C, Nq,
        2D]: the score of ``tokens(images)`` up to float rounding, without a float32 copy of the scaled values."""
        values = _float32(self.store, images)
        if self.scales is None:
            return fused_scores(query[None], values, self.fusion_score)[0]
        halves = torch.einsum("hd,nkhd->nkh", query.float().view(2, -1), values.unflatten(-1, (2, -1)))
        halves = halves * _float32(self.scales, images)  # [C, Nq, 2]: each half's token score
        if fusion_rule(self.fusion_score).joint:
            return halves.sum(dim=-1).amax(dim=-1)
        return halves.amax(dim=1).sum(dim=-1)

    def tokens(self, images) -> torch.Tensor:
        """The store's unified embeddings of gallery rows ``images`` (sorted indices or a slice) as float32
        [C, Nq, 2D]: the values re-ranking scores (an int8 store: times each token half's scale)."""
        values = _float32(self.store, images)
        if self.scales is None:
            return values
        halves = values.unflatten(-1, (2, -1)) * _float32(self.scales, images)[..., None]
        return halves.flatten(-2)

    # -- sizes ---------------------------------------------------------------------------------------

    def memory_bytes(self) -> int:
        """RAM of the FAISS indexes in bytes: per token vector its code and 8-byte id, plus the IVF centroids and the
        PQ codebooks (float32)."""
        return _memory_bytes(self.searchers)

    def store_bytes(self) -> int:
        """Disk bytes of the re-ranking store (memory-mapped, read only at the candidates' rows), with its scales."""
        return store_file_bytes(self.directory)


class Codec:
    """The trained, still empty FAISS indexes of one gallery (one per branch half, or one over the whole token for
    joint_max) with the resolved config and fusion rule: what every ``IndexWriter`` of the gallery (one per shard)
    starts from. Picklable (FAISS's own serialisation), so a Ray task can ship it to the shards' builders."""

    def __init__(self, searchers: list, config: CompressedIndexConfig, fusion_score: str, tokens: int, width: int):
        self.searchers, self.config, self.fusion_score = searchers, config, fusion_score
        self.tokens, self.width = tokens, width  # Nq, 2D
        self.per_image = config.pool or tokens  # vectors each image puts in each FAISS index

    def vectors(self, embeddings: np.ndarray, part: slice) -> np.ndarray:
        """The vectors [B, per_image, d] that images' unified embeddings [B, Nq, 2D] put in the FAISS index of the
        columns ``part``: their tokens, or with ``config.pool`` the pooled ones (``pool_tokens``)."""
        vectors = np.ascontiguousarray(embeddings[..., part])
        return pool_tokens(vectors, self.config.pool) if self.config.pool else vectors

    @classmethod
    def train(cls, sample, vectors: int, config: CompressedIndexConfig = CompressedIndexConfig(),
              fusion_score: str = DEFAULT_FUSION_RULE) -> "Codec":
        """Train on the unified embeddings of whole sample images [S, Nq, 2D] (torch or numpy) for indexes of
        ``vectors`` token vectors each (it sets the automatic nlist): IVF centroids and PQ codebooks per searcher,
        on at most ``config.train_sample`` token vectors."""
        check_rule(fusion_score)
        if len(sample.shape) != 3 or sample.shape[2] % 2:
            raise ValueError(f"codec sample {tuple(sample.shape)} is not [S, Nq, 2D]")
        _, tokens, width = (int(n) for n in sample.shape)
        if config.pool >= tokens:
            raise ConfigError(f"compressed index: pool={config.pool} must be below the {tokens} tokens per image "
                              "(0: every token vector)")
        config = config.resolved(vectors * (config.pool or tokens) // tokens, width // 2)
        joint = fusion_rule(fusion_score).joint
        code = replace(config, m=2 * config.m) if joint else config  # a joint rule: whole 2D tokens, 2 m bytes
        codec = cls([], config, fusion_score, tokens, width)
        values = _float32(sample, slice(None)).numpy()
        for part in fusion_rule(fusion_score).parts(width):
            vectors = codec.vectors(values, part)
            flat = np.ascontiguousarray(vectors.reshape(-1, vectors.shape[-1])[:config.train_sample])
            if len(flat) < max(config.nlist, 2 ** config.nbits):
                raise ConfigError(f"compressed index: {len(flat)} training vectors (train_sample, at most the "
                                  f"gallery's) cannot train nlist={config.nlist} lists and 2^nbits="
                                  f"{2 ** config.nbits} codes per sub-quantizer; lower nlist or nbits")
            codec.searchers.append(_trained(flat, code))
        return codec

    def __getstate__(self) -> dict:
        import faiss

        return {**self.__dict__, "searchers": [faiss.serialize_index(s) for s in self.searchers]}

    def __setstate__(self, state: dict) -> None:
        import faiss

        self.__dict__.update(state, searchers=[faiss.deserialize_index(s) for s in state["searchers"]])


class IndexWriter:
    """Writes one compressed index of ``images`` rows into ``directory`` from chunks of rows in any order (one
    writer per shard; a Ray actor in ``detailfusion index``): ``add`` codes the rows' token vectors into copies of
    the codec's indexes and writes them into the store; ``finish`` checks every row came, then writes the FAISS
    files, ``images.parquet`` and ``index.json`` (last) and opens the index."""

    def __init__(self, directory: str | Path, codec: Codec, images: int, model_fingerprint: str):
        import faiss

        self.directory, self.codec, self.model_fingerprint = Path(directory), codec, model_fingerprint
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / META_FILE).unlink(missing_ok=True)  # a half-rewritten index is no index
        self.searchers = [faiss.clone_index(s) for s in codec.searchers]
        self.parts = fusion_rule(codec.fusion_score).parts(codec.width)
        self.store = np.lib.format.open_memmap(self.directory / STORE_FILE, mode="w+", dtype=codec.config.store_dtype,
                                               shape=(images, codec.tokens, codec.width))
        (self.directory / SCALES_FILE).unlink(missing_ok=True)
        self.scales = None if codec.config.store_dtype != "int8" else np.lib.format.open_memmap(
            self.directory / SCALES_FILE, mode="w+", dtype=np.float32, shape=(images, codec.tokens, 2))
        self.added = np.zeros(images, dtype=bool)

    def add(self, rows, embeddings) -> None:
        """Rows of this index [B] (each once) and their unified embeddings [B, Nq, 2D] (numpy or torch, any float)."""
        rows = np.asarray(rows, dtype=np.int64)
        embeddings = np.asarray(embeddings, dtype=np.float32)
        if embeddings.shape != (len(rows), self.codec.tokens, self.codec.width):
            raise ValueError(f"{len(rows)} rows with embeddings {embeddings.shape}; expected "
                             f"[{len(rows)}, {self.codec.tokens}, {self.codec.width}]")
        if len(rows) and (rows.min() < 0 or rows.max() >= len(self.added)):
            raise ValueError(f"rows {rows.min()}..{rows.max()} outside this index's 0..{len(self.added) - 1}")
        if self.added[rows].any() or len(np.unique(rows)) < len(rows):
            raise ValueError(f"rows added twice, e.g. {rows[self.added[rows]][:3].tolist() or 'within one call'}")
        if self.scales is None:
            self.store[rows] = embeddings
        else:  # symmetric int8 per token and branch half: x ~ q * scale, |q| <= 127
            halves = embeddings.reshape(len(rows), self.codec.tokens, 2, -1)
            scale = np.abs(halves).max(axis=-1) / 127
            scale[scale == 0] = 1.0
            self.store[rows] = np.rint(halves / scale[..., None]).astype(np.int8).reshape(embeddings.shape)
            self.scales[rows] = scale
        per_image = self.codec.per_image
        ids = (rows[:, None] * per_image + np.arange(per_image)).reshape(-1)
        for searcher, part in zip(self.searchers, self.parts):
            vectors = self.codec.vectors(embeddings, part).reshape(len(ids), -1)
            searcher.add_with_ids(np.ascontiguousarray(vectors), ids)
        self.added[rows] = True

    def memory_bytes(self) -> int:
        """RAM of the FAISS indexes written so far (``CompressedIndex.memory_bytes`` of the finished index)."""
        return _memory_bytes(self.searchers)

    def finish(self, image_ids: list[str], locations: list[str | None] | None = None,
               thumbnails: list[bytes | None] | None = None, source: dict | None = None) -> Path:
        """Write the ids (with locations and JPEG thumbnails, where given) of rows 0..N-1 and the rest of the index;
        returns its directory (``CompressedIndex.load`` opens it)."""
        import faiss

        missing = np.flatnonzero(~self.added)
        if len(missing) or len(image_ids) != len(self.added):
            raise ValueError(f"{self.directory}: {len(missing)} of {len(self.added)} rows never added (first: "
                             f"{missing[:3].tolist()}), {len(image_ids)} image ids")
        for array in (self.store, self.scales):
            if array is not None:
                array.flush()
        del self.store, self.scales
        names = list(FAISS_FILES[2:] if len(self.searchers) == 1 else FAISS_FILES[:2])
        for searcher, name in zip(self.searchers, names):
            faiss.write_index(searcher, str(self.directory / name))
        write_images(self.directory / IMAGES_FILE, image_ids, locations, thumbnails)
        codec, images = self.codec, len(self.added)
        meta = {"backend": BACKEND, "model_fingerprint": self.model_fingerprint, "fusion_score": codec.fusion_score,
                "images": images, "shape": [images, codec.tokens, codec.width], "config": asdict(codec.config),
                "faiss_files": names, "faiss_version": faiss.__version__, "source": source or {}}
        (self.directory / META_FILE).write_text(json.dumps(meta, indent=1))
        return self.directory


def _memory_bytes(searchers: list) -> int:
    """RAM of IVF-PQ indexes in bytes: per token vector its code and 8-byte id, plus the IVF centroids and the PQ
    codebooks (float32)."""
    return sum(s.ntotal * (s.code_size + 8) + (s.nlist * s.d + s.pq.M * s.pq.ksub * s.pq.dsub) * 4 for s in searchers)


def store_file_bytes(directory: Path) -> int:
    """Disk bytes of the re-ranking store in ``directory`` and its scales (int8 stores)."""
    return sum((directory / name).stat().st_size for name in (STORE_FILE, SCALES_FILE) if (directory / name).is_file())


def pool_tokens(vectors: np.ndarray, pool: int, iterations: int = 8) -> np.ndarray:
    """Each image's token vectors [B, Nq, d] (float32) -> ``pool`` pooled vectors [B, P, d]: the cluster means of a
    k-means (cosine) over that image's own tokens, started from P tokens picked farthest-first (deterministic)."""
    x = torch.from_numpy(np.ascontiguousarray(vectors, dtype=np.float32))
    count, tokens, width = x.shape
    similar = x @ x.transpose(1, 2)  # [B, Nq, Nq]
    picked = torch.zeros(count, pool, dtype=torch.long)  # the first start: token 0
    nearest = similar[:, 0].clone()  # each token's highest similarity to a picked one
    for j in range(1, pool):
        picked[:, j] = nearest.argmin(dim=1)
        nearest = torch.maximum(nearest, similar.gather(1, picked[:, j, None, None].expand(-1, 1, tokens))[:, 0])
    centres = x.gather(1, picked[..., None].expand(-1, -1, width))
    for _ in range(iterations):
        assign = torch.einsum("bnd,bpd->bnp", x, torch.nn.functional.normalize(centres, dim=-1)).argmax(dim=2)
        members = torch.nn.functional.one_hot(assign, pool).float()  # [B, Nq, P]
        counts = members.sum(dim=1)[..., None]  # [B, P, 1]
        centres = torch.where(counts > 0, members.transpose(1, 2) @ x / counts.clamp(min=1), centres)
    return centres.numpy()


@functools.cache
def _branch_pool():
    """The threads that search a query's two branch indexes at once (one process-wide pool of two)."""
    from concurrent.futures import ThreadPoolExecutor

    return ThreadPoolExecutor(max_workers=2, thread_name_prefix="ivfpq-branch")


def sample_rows(images: int, tokens: int, config: CompressedIndexConfig) -> np.ndarray:
    """Sorted rows of the whole images (of ``images`` with ``tokens`` tokens each) whose token vectors train the
    codec: enough for ``config.train_sample`` vectors, drawn with ``config.seed``."""
    count = min(images, math.ceil(config.train_sample / (config.pool or tokens)))
    return np.sort(np.random.default_rng(config.seed).choice(images, size=count, replace=False))


def _trained(sample: np.ndarray, config: CompressedIndexConfig):
    """An empty IVF-PQ inner-product index (residual codes) trained on token vectors [S, d] float32."""
    import faiss

    width = sample.shape[1]
    quantizer = faiss.IndexFlatIP(width)
    searcher = faiss.IndexIVFPQ(quantizer, width, config.nlist, config.m, config.nbits, faiss.METRIC_INNER_PRODUCT)
    searcher.cp.seed = searcher.pq.cp.seed = config.seed
    searcher.train(sample)
    return searcher  # FAISS's Python wrapper keeps the quantizer alive with it
