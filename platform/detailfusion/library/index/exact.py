"""The gallery index: one unified embedding per image (METHOD.md ``t = [t_gm ; t_di] / sqrt 2``, [Nq, 2D]) with
its image name and the fingerprint and fusion score of the model that made it; exact top-k search in torch, FAISS
optional.

Every blend of the branches searches the same index: a unified query ``u`` [2D] scores image k by the model's
fusion score (``model/fusion.py``: ``branch_max``, one max per branch half, or ``joint_max``, one max over both).
On disk (``save``/``load``): ``embeddings.safetensors`` (tensor ``embeddings`` [N, Nq, 2D] float32),
``images.parquet`` (image_id, location, thumbnail), ``index.json`` (backend ``exact``, model fingerprint, fusion
score, shapes, source). The compressed backend for catalogues is ``compressed_index.py``; ``index_store.open_index``
opens either.
"""

from __future__ import annotations

import bisect
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from detailfusion.library.errors import DataError
from detailfusion.library.model.fusion import DEFAULT_FUSION_RULE, check_rule, fused_scores, fusion_rule
from detailfusion.library.ranking import top_k

EMBEDDINGS_FILE, IMAGES_FILE, META_FILE = "embeddings.safetensors", "images.parquet", "index.json"
BACKEND = "exact"  # index.json's "backend" (an index from before the key is one)
THUMBNAIL_ROWS = 256  # images per row group of images.parquet: serving reads one group to show one thumbnail


class IndexMismatch(DataError):
    """An index used with a model other than the one that built it."""


def check_fingerprint(built_by: str, in_use: str, where: str = "index") -> None:
    """Refuse (``IndexMismatch``) an index built by model ``built_by`` for the model ``in_use`` (fingerprints)."""
    if in_use != built_by:
        raise IndexMismatch(
            f"{where} was built by model {built_by}, but the model in use is {in_use}; "
            "rebuild the index with this model (detailfusion index)"
        )


def read_meta(directory: Path, backend: str) -> dict:
    """``index.json`` of a complete index of ``backend`` in ``directory`` (an index from before the key: exact);
    FileNotFoundError without one, ValueError for another backend (``index_store.open_index`` opens any)."""
    kind = {BACKEND: ("gallery", "an exact"), "ivfpq": ("compressed", "a compressed")}.get(backend, (backend, f"a {backend}"))
    meta_path = Path(directory) / META_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(f"{directory}: no {META_FILE}; not a complete {kind[0]} index")
    meta = json.loads(meta_path.read_text())
    if meta.get("backend", BACKEND) != backend:
        raise ValueError(f"{directory}: a {meta.get('backend', BACKEND)!r} index, not {kind[1]} one "
                         "(index_store.open_index opens any)")
    return meta


def write_images(path: Path, image_ids: list[str], locations: list[str | None] | None,
                 thumbnails: list[bytes | None] | None) -> None:
    """``images.parquet`` of every backend: image_id, location, thumbnail (JPEG or null)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    locations = locations or [None] * len(image_ids)
    thumbnails = thumbnails or [None] * len(image_ids)
    pq.write_table(pa.table({"image_id": image_ids, "location": pa.array(locations, type=pa.string()),
                             "thumbnail": pa.array(thumbnails, type=pa.binary())}), path,
                   row_group_size=THUMBNAIL_ROWS)


def concat_images(parts: list[Path], path: Path) -> None:
    """One ``images.parquet`` from several (the shards' in order), read one at a time."""
    import pyarrow.parquet as pq

    with pq.ParquetWriter(path, pq.read_schema(parts[0])) as writer:
        for part in parts:
            writer.write_table(pq.read_table(part), row_group_size=THUMBNAIL_ROWS)


class Thumbnails:
    """The image ids of an index's ``images.parquet`` and their JPEG thumbnails, read on demand one row group
    (``THUMBNAIL_ROWS`` images) at a time, the last ``cached_groups`` groups kept: a catalogue's thumbnails are
    never all in memory (a file written before row groups were small has one group: read whole, once)."""

    def __init__(self, path: str | Path, cached_groups: int = 16):
        import functools
        import itertools
        import threading

        import pyarrow.parquet as pq

        self.file = pq.ParquetFile(path)
        self.image_ids: list[str] = self.file.read(columns=["image_id"]).column(0).to_pylist()
        self.row = {name: row for row, name in enumerate(self.image_ids)}
        sizes = [self.file.metadata.row_group(g).num_rows for g in range(self.file.num_row_groups)]
        self.starts = [0, *itertools.accumulate(sizes)][:-1]  # first row of each group
        self.has_thumbnails = "thumbnail" in self.file.schema_arrow.names
        self.lock = threading.Lock()  # one reader of the file at a time (handlers run in a thread pool)
        self.group = functools.lru_cache(maxsize=cached_groups)(self._read_group)

    def _read_group(self, group: int) -> list:
        return self.file.read_row_group(group, columns=["thumbnail"]).column(0).to_pylist()

    def get(self, image_id: str) -> bytes | None:
        """The JPEG of ``image_id``; None for an unknown image or one without a thumbnail."""
        row = self.row.get(image_id)
        if row is None or not self.has_thumbnails:
            return None
        group = bisect.bisect_right(self.starts, row) - 1
        with self.lock:
            return self.group(group)[row - self.starts[group]] or None


@dataclass
class GalleryIndex:
    embeddings: torch.Tensor  # [N, Nq, 2D] float32, L2-normalised per token and scaled by 1/sqrt 2
    image_ids: list[str]
    model_fingerprint: str
    locations: list[str | None] = field(default_factory=list)  # where each image came from (for thumbnails)
    source: dict = field(default_factory=dict)  # dataset, split, prepared dir
    thumbnails: list[bytes | None] = field(default_factory=list)  # JPEG at the model's resolution (serving)
    fusion_score: str = DEFAULT_FUSION_RULE  # the model's rule (model/fusion.py)

    def __post_init__(self):
        if self.embeddings.ndim != 3 or self.embeddings.shape[0] != len(self.image_ids):
            raise ValueError(f"embeddings {tuple(self.embeddings.shape)} do not match {len(self.image_ids)} image ids")
        check_rule(self.fusion_score)
        self.position = {name: i for i, name in enumerate(self.image_ids)}

    def __len__(self) -> int:
        return len(self.image_ids)

    def scores(self, queries: torch.Tensor, rows: torch.Tensor | None = None, chunk: int = 256) -> torch.Tensor:
        """Unified queries [Q, 2D] -> scores [Q, N] by the fusion score, or [Q, len(rows)] for a gallery subset."""
        gallery = self.embeddings if rows is None else self.embeddings[rows]
        parts = [fused_scores(q, gallery, self.fusion_score) for q in queries.split(chunk)]
        return torch.cat(parts) if parts else queries.new_zeros(0, gallery.shape[0])

    def search(self, queries: torch.Tensor, k: int, exclude: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact top-k: (scores [Q, k], gallery indices [Q, k]), best first; ties by gallery order."""
        scores = self.scores(queries)
        indices = top_k(scores, k, exclude)
        return scores.gather(1, indices), indices

    def search_faiss(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The same top-k as ``search`` from FAISS flat inner-product indexes over the token vectors; exact.

        joint_max: any token scoring above the k-th image's best token belongs to one of the k-1 better images, so the
        best ``k * Nq`` token hits hold the top k images (deduplicated in order of hits). branch_max (a sum of one max
        per half): the best ``m`` token hits of each half give candidate images, rescored exactly; an image that is
        no candidate scores at most ``a + b`` (the m-th hit of each half), so the candidates' top k is the answer once
        its k-th score reaches ``a + b``; otherwise ``m`` doubles (at worst every token: exact scoring).
        """
        if fusion_rule(self.fusion_score).joint:
            return self._joint_faiss(queries, k)
        return self._branch_faiss(queries, k)

    def _flat(self, columns: slice):
        import faiss
        import numpy as np

        vectors = self.embeddings[..., columns]
        flat = faiss.IndexFlatIP(vectors.shape[2])
        flat.add(np.ascontiguousarray(vectors.reshape(-1, vectors.shape[2]).float().numpy()))
        return flat

    def _joint_faiss(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        import numpy as np

        tokens = self.embeddings.shape[1]
        flat = self._flat(slice(None))
        hit_scores, hits = flat.search(np.ascontiguousarray(queries.float().numpy()), min(k * tokens, flat.ntotal))
        best_scores, best = torch.empty(len(queries), k), torch.empty(len(queries), k, dtype=torch.long)
        for q in range(len(queries)):
            images = hits[q] // tokens
            _, first = np.unique(images, return_index=True)
            order = first[np.argsort(first, kind="stable")][:k]
            best[q], best_scores[q] = torch.from_numpy(images[order]), torch.from_numpy(hit_scores[q][order])
        return best_scores, best

    def _branch_faiss(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        import numpy as np

        tokens, half = self.embeddings.shape[1], self.embeddings.shape[2] // 2
        halves = [(self._flat(part), np.ascontiguousarray(queries[:, part].float().numpy()))
                  for part in (slice(None, half), slice(half, None))]
        best_scores, best = torch.empty(len(queries), k), torch.empty(len(queries), k, dtype=torch.long)
        total = len(self) * tokens
        for q in range(len(queries)):
            hits = k * tokens
            while True:
                found = [flat.search(vectors[q:q + 1], min(hits, total)) for flat, vectors in halves]
                candidates = np.unique(np.concatenate([ids[0] // tokens for _, ids in found]))
                rows = torch.from_numpy(candidates)
                exact = self.scores(queries[q:q + 1], rows=rows)[0]
                order = top_k(exact[None], min(k, len(rows)))[0]
                bound = sum(float(scores[0, -1]) for scores, _ in found)  # what a non-candidate can reach at most
                if hits >= total or (len(order) == k and float(exact[order[-1]]) > bound):
                    break
                hits *= 2
            best[q], best_scores[q] = rows[order], exact[order]
        return best_scores, best

    def check_model(self, fingerprint: str, where: str = "index") -> None:
        """Refuse (``IndexMismatch``) a model other than the one that built the index."""
        check_fingerprint(self.model_fingerprint, fingerprint, where)

    # -- files ---------------------------------------------------------------------------------------

    def save(self, directory: str | Path) -> Path:
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file({"embeddings": self.embeddings.float().contiguous()}, str(directory / EMBEDDINGS_FILE))
        write_images(directory / IMAGES_FILE, self.image_ids, self.locations, self.thumbnails)
        meta = {"backend": BACKEND, "model_fingerprint": self.model_fingerprint, "fusion_score": self.fusion_score,
                "images": len(self), "shape": list(self.embeddings.shape), "source": self.source}
        (directory / META_FILE).write_text(json.dumps(meta, indent=1))  # last: its presence marks a whole index
        return directory

    @classmethod
    def load(cls, directory: str | Path, model_fingerprint: str | None = None) -> "GalleryIndex":
        """Read an index; with ``model_fingerprint``, refuse one built by another model."""
        import pyarrow.parquet as pq
        from safetensors.torch import load_file

        directory = Path(directory)
        meta = read_meta(directory, BACKEND)
        table = pq.read_table(directory / IMAGES_FILE)
        index = cls(
            embeddings=load_file(str(directory / EMBEDDINGS_FILE))["embeddings"],
            image_ids=table.column("image_id").to_pylist(),
            model_fingerprint=meta["model_fingerprint"],
            locations=table.column("location").to_pylist(),
            source=meta.get("source", {}),
            thumbnails=table.column("thumbnail").to_pylist() if "thumbnail" in table.column_names else [],
            fusion_score=meta.get("fusion_score", DEFAULT_FUSION_RULE),  # an index from before the key
        )
        if model_fingerprint is not None:
            index.check_model(model_fingerprint, where=f"index {directory}")
        return index
