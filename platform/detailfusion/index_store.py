"""A gallery index directory of either backend: ``write_index`` writes a ``GalleryIndex`` as the exact index
(``index.py``) or the compressed one (``compressed_index.py``: IVF-PQ candidates + exact re-ranking), as
``IndexBackendConfig`` says; ``open_index`` opens whichever ``index.json``'s ``backend`` names (absent: exact).

Both open indexes answer the same calls: ``image_ids``, ``len``, ``search(queries [Q, 2D], k)`` -> (scores [Q, k],
gallery indices [Q, k]) best first with ties by gallery order, ``check_model``, ``fusion_score``. Both write
``images.parquet`` (image_id, location, thumbnail) and ``index.json`` (with ``model_fingerprint``) the same way.
"""

from __future__ import annotations

import json
from pathlib import Path

from .compressed_index import BACKEND as IVFPQ, FAISS_FILES, STORE_FILE, CompressedIndex
from .config import IndexBackendConfig
from .errors import ConfigError, DataError
from .index import BACKEND as EXACT, EMBEDDINGS_FILE, META_FILE, GalleryIndex

# each backend's own files (images.parquet and index.json are common): removed when the other backend is written
BACKEND_FILES = {EXACT: (EMBEDDINGS_FILE,), IVFPQ: (STORE_FILE, *FAISS_FILES)}


def stored_backend(directory: str | Path) -> str | None:
    """The backend of the complete index in ``directory`` ("exact" or "ivfpq"), None when there is none."""
    meta = Path(directory) / META_FILE
    return json.loads(meta.read_text()).get("backend", EXACT) if meta.is_file() else None


def open_index(directory: str | Path, model_fingerprint: str | None = None) -> GalleryIndex | CompressedIndex:
    """Open the index in ``directory``, exact or compressed; with ``model_fingerprint``, refuse one built by another
    model (``IndexMismatch``)."""
    backend = stored_backend(directory)
    if backend is None:
        raise FileNotFoundError(f"{directory}: no {META_FILE}; not a complete gallery index")
    if backend == EXACT:
        return GalleryIndex.load(directory, model_fingerprint)
    if backend == IVFPQ:
        return CompressedIndex.load(directory, model_fingerprint)
    raise DataError(f"{directory}: unknown index backend {backend!r} (known: {', '.join(BACKEND_FILES)})")


def write_index(gallery: GalleryIndex, directory: str | Path,
                backend: IndexBackendConfig = IndexBackendConfig()) -> GalleryIndex | CompressedIndex:
    """Write ``gallery`` into ``directory`` as ``backend.kind`` says (ivfpq: compressed by ``backend.ivfpq``),
    replacing any index there (the other backend's files removed); returns the open index."""
    if backend.kind not in BACKEND_FILES:
        raise ConfigError(f"index_backend.kind={backend.kind!r}; known: {', '.join(BACKEND_FILES)}")
    directory = Path(directory)
    (directory / META_FILE).unlink(missing_ok=True)  # first: a half-rewritten index is no index
    for name in (n for kind, names in BACKEND_FILES.items() if kind != backend.kind for n in names):
        (directory / name).unlink(missing_ok=True)
    if backend.kind == EXACT:
        gallery.save(directory)
        return gallery
    return CompressedIndex.from_gallery(gallery, directory, backend.ivfpq)
