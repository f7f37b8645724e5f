"""The gallery index: one unified embedding per image (METHOD.md ``t = [t_gm ; t_di] / sqrt 2``, [Nq, 2D]) with
its image name and the fingerprint of the model that made it; exact top-k search in torch, FAISS optional.

Every fusion rule searches the same index: a unified query ``u`` [2D] scores image k as ``max_j <u, t_k,j>``.
On disk (``save``/``load``): ``embeddings.safetensors`` (tensor ``embeddings`` [N, Nq, 2D] float32),
``images.parquet`` (image_id, location), ``index.json`` (model fingerprint, shapes, source).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .eval.metrics import top_k

EMBEDDINGS_FILE, IMAGES_FILE, META_FILE = "embeddings.safetensors", "images.parquet", "index.json"


class IndexMismatch(ValueError):
    """An index used with a model other than the one that built it."""


@dataclass
class GalleryIndex:
    embeddings: torch.Tensor  # [N, Nq, 2D] float32, L2-normalised per token and scaled by 1/sqrt 2
    image_ids: list[str]
    model_fingerprint: str
    locations: list[str | None] = field(default_factory=list)  # where each image came from (for thumbnails)
    source: dict = field(default_factory=dict)  # dataset, split, prepared dir
    thumbnails: list[bytes | None] = field(default_factory=list)  # JPEG at the model's resolution (serving)

    def __post_init__(self):
        if self.embeddings.ndim != 3 or self.embeddings.shape[0] != len(self.image_ids):
            raise ValueError(f"embeddings {tuple(self.embeddings.shape)} do not match {len(self.image_ids)} image ids")
        self.position = {name: i for i, name in enumerate(self.image_ids)}

    def __len__(self) -> int:
        return len(self.image_ids)

    def scores(self, queries: torch.Tensor, rows: torch.Tensor | None = None, chunk: int = 256) -> torch.Tensor:
        """Unified queries [Q, 2D] -> scores [Q, N] (``max_j <u, t_k,j>``), or [Q, len(rows)] for a gallery subset."""
        gallery = self.embeddings if rows is None else self.embeddings[rows]
        gallery = gallery.to(queries.dtype)
        parts = [torch.einsum("qd,nkd->qnk", q, gallery).amax(dim=-1) for q in queries.split(chunk)]
        return torch.cat(parts) if parts else queries.new_zeros(0, gallery.shape[0])

    def search(self, queries: torch.Tensor, k: int, exclude: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact top-k: (scores [Q, k], gallery indices [Q, k]), best first; ties by gallery order."""
        scores = self.scores(queries)
        indices = top_k(scores, k, exclude)
        return scores.gather(1, indices), indices

    def search_faiss(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The same top-k from a FAISS flat inner-product index over every token vector.

        Exact, not approximate: any token scoring above the k-th image's best token belongs to one of the k-1
        better images, so the best ``k * Nq`` token hits hold the top k images; deduplicated in order of hits.
        """
        import faiss
        import numpy as np

        tokens = self.embeddings.shape[1]
        flat = faiss.IndexFlatIP(self.embeddings.shape[2])
        flat.add(np.ascontiguousarray(self.embeddings.reshape(-1, self.embeddings.shape[2]).float().numpy()))
        hit_scores, hits = flat.search(np.ascontiguousarray(queries.float().numpy()), min(k * tokens, flat.ntotal))
        best_scores, best = torch.empty(len(queries), k), torch.empty(len(queries), k, dtype=torch.long)
        for q in range(len(queries)):
            images = hits[q] // tokens
            _, first = np.unique(images, return_index=True)
            order = first[np.argsort(first, kind="stable")][:k]
            best[q], best_scores[q] = torch.from_numpy(images[order]), torch.from_numpy(hit_scores[q][order])
        return best_scores, best

    def check_model(self, fingerprint: str, where: str = "index") -> None:
        if fingerprint != self.model_fingerprint:
            raise IndexMismatch(
                f"{where} was built by model {self.model_fingerprint}, but the model in use is {fingerprint}; "
                "rebuild the index with this model (detailfusion index)"
            )

    # -- files ---------------------------------------------------------------------------------------

    def save(self, directory: str | Path) -> Path:
        import pyarrow as pa
        import pyarrow.parquet as pq
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file({"embeddings": self.embeddings.float().contiguous()}, str(directory / EMBEDDINGS_FILE))
        locations = self.locations or [None] * len(self)
        thumbnails = self.thumbnails or [None] * len(self)
        table = pa.table({"image_id": self.image_ids, "location": locations,
                          "thumbnail": pa.array(thumbnails, type=pa.binary())})
        pq.write_table(table, directory / IMAGES_FILE)
        meta = {"model_fingerprint": self.model_fingerprint, "images": len(self),
                "shape": list(self.embeddings.shape), "source": self.source}
        (directory / META_FILE).write_text(json.dumps(meta, indent=1))  # last: its presence marks a whole index
        return directory

    @classmethod
    def load(cls, directory: str | Path, model_fingerprint: str | None = None) -> "GalleryIndex":
        """Read an index; with ``model_fingerprint``, refuse one built by another model."""
        import pyarrow.parquet as pq
        from safetensors.torch import load_file

        directory = Path(directory)
        meta_path = directory / META_FILE
        if not meta_path.is_file():
            raise FileNotFoundError(f"{directory}: no {META_FILE}; not a complete gallery index")
        meta = json.loads(meta_path.read_text())
        table = pq.read_table(directory / IMAGES_FILE)
        index = cls(
            embeddings=load_file(str(directory / EMBEDDINGS_FILE))["embeddings"],
            image_ids=table.column("image_id").to_pylist(),
            model_fingerprint=meta["model_fingerprint"],
            locations=table.column("location").to_pylist(),
            source=meta.get("source", {}),
            thumbnails=table.column("thumbnail").to_pylist() if "thumbnail" in table.column_names else [],
        )
        if model_fingerprint is not None:
            index.check_model(model_fingerprint, where=f"index {directory}")
        return index
