"""The one index API: a gallery index directory of any backend is written and opened here. ``write_index`` writes an
in-memory ``GalleryIndex`` as the exact index (``exact.py``), the compressed one (``compressed.py``: IVF-PQ candidates
+ exact re-ranking) or shards of either, as ``IndexBackendConfig`` says (the platform's streamed build,
``platform/eval/index_build.py``, writes through ``clear_index``, the compressed ``IndexWriter`` and
``write_sharded_meta``); ``open_index`` opens whichever ``index.json``'s ``backend`` names (absent: exact), with
serve-time ``SearchSettings``; ``index_meta`` reads its facts (nobody else parses index.json).

Both open indexes answer the same calls: ``image_ids``, ``len``, ``search(queries [Q, 2D], k)`` -> (scores [Q, k],
gallery indices [Q, k]) best first with ties by gallery order, ``check_model``, ``fusion_score``. Both write
``images.parquet`` (image_id, location, thumbnail) and ``index.json`` (with ``model_fingerprint``) the same way.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

from detailfusion.library.errors import ConfigError, DataError
from detailfusion.library.index.compressed import BACKEND as IVFPQ
from detailfusion.library.index.compressed import FAISS_FILES, SCALES_FILE, STORE_FILE, CompressedIndex
from detailfusion.library.index.exact import BACKEND as EXACT
from detailfusion.library.index.exact import (
    EMBEDDINGS_FILE,
    IMAGES_FILE,
    META_FILE,
    GalleryIndex,
    check_fingerprint,
    read_meta,
)
from detailfusion.library.index.settings import IndexBackendConfig, SearchSettings
from detailfusion.library.index.sharded import SHARDED, ShardedIndex, shard_bounds, shard_directories, shard_name

# each backend's own files (images.parquet and index.json are common): removed when the other backend is written
BACKEND_FILES = {EXACT: (EMBEDDINGS_FILE,), IVFPQ: (STORE_FILE, SCALES_FILE, *FAISS_FILES)}


def index_meta(directory: str | Path) -> dict:
    """The ``index.json`` of the complete index in ``directory`` (its backend, model fingerprint, fusion rule,
    shards...); FileNotFoundError when there is none."""
    path = Path(directory) / META_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{directory}: no {META_FILE}; not a complete gallery index (build one with "
                                "`detailfusion index`)")
    return json.loads(path.read_text())


def stored_backend(directory: str | Path) -> str | None:
    """The backend of the complete index in ``directory`` ("exact", "ivfpq" or "sharded"), None when there is none."""
    meta = Path(directory) / META_FILE
    return json.loads(meta.read_text()).get("backend", EXACT) if meta.is_file() else None


def open_index(directory: str | Path, model_fingerprint: str | None = None,
               search: SearchSettings = SearchSettings()) -> GalleryIndex | CompressedIndex | ShardedIndex:
    """Open the index in ``directory``, exact, compressed or sharded; with ``model_fingerprint``, refuse one built by
    another model (``IndexMismatch``). ``search``: a compressed index's search settings in place of its built ones
    (no rebuild); refused for an exact index, which has none."""
    backend = index_meta(directory).get("backend", EXACT)
    if backend == SHARDED:
        meta = read_meta(Path(directory), SHARDED)
        if model_fingerprint is not None:
            check_fingerprint(meta["model_fingerprint"], model_fingerprint, where=f"index {directory}")
        shards = [open_index(Path(directory) / name, model_fingerprint, search) for name in meta["shards"]]
        return ShardedIndex(shards, meta["offsets"], meta["model_fingerprint"], meta["fusion_score"])
    if backend == EXACT:
        if search.given():
            raise ConfigError(f"search settings {search.given()} apply to a compressed (ivfpq) index; {directory} is "
                              "exact: it searches every token")
        return GalleryIndex.load(directory, model_fingerprint)
    if backend == IVFPQ:
        index = CompressedIndex.load(directory, model_fingerprint)
        index.config = replace(index.config, **search.given())
        return index
    raise DataError(f"{directory}: unknown index backend {backend!r} (known: {', '.join(BACKEND_FILES)})")


def clear_index(directory: str | Path, kind: str) -> Path:
    """Ready ``directory`` for a new index of backend ``kind``: its index.json removed first (a half-rewritten index
    is no index), then the other backend's files and any shards."""
    if kind not in BACKEND_FILES:
        raise ConfigError(f"index_backend.kind={kind!r}; known: {', '.join(BACKEND_FILES)}")
    directory = Path(directory)
    (directory / META_FILE).unlink(missing_ok=True)
    for name in (n for other, names in BACKEND_FILES.items() if other != kind for n in names):
        (directory / name).unlink(missing_ok=True)
    for old in shard_directories(directory):
        shutil.rmtree(old)
    return directory


def write_sharded_meta(directory: Path, kind: str, bounds: list[tuple[int, int]], model_fingerprint: str,
                       fusion_score: str, source: dict) -> dict:
    """The sharded index's ``index.json`` (written last: its presence marks a whole index), its content returned."""
    meta = {"backend": SHARDED, "shard_backend": kind, "model_fingerprint": model_fingerprint,
            "fusion_score": fusion_score, "images": bounds[-1][1], "shards": [shard_name(s) for s in range(len(bounds))],
            "offsets": [start for start, _ in bounds], "source": source}
    (Path(directory) / META_FILE).write_text(json.dumps(meta, indent=1))
    return meta


def write_index(gallery: GalleryIndex, directory: str | Path,
                backend: IndexBackendConfig = IndexBackendConfig()) -> GalleryIndex | CompressedIndex:
    """Write ``gallery`` into ``directory`` as ``backend.kind`` says (ivfpq: compressed by ``backend.ivfpq``),
    replacing any index there (the other backend's files removed); returns the open index."""
    directory = clear_index(directory, backend.kind)
    if backend.shards > 1:
        return _write_sharded(gallery, directory, backend)
    if backend.kind == EXACT:
        gallery.save(directory)
        return gallery
    return CompressedIndex.from_gallery(gallery, directory, backend.ivfpq)


def _write_sharded(gallery: GalleryIndex, directory: Path, backend: IndexBackendConfig) -> ShardedIndex:
    """``backend.shards`` contiguous slices of ``gallery``, each written as a ``backend.kind`` index in
    ``shard-<s>/``; the whole gallery's images.parquet; index.json last."""
    from detailfusion.library.index.exact import write_images

    directory.mkdir(parents=True, exist_ok=True)
    bounds = shard_bounds(len(gallery), backend.shards)
    one = replace(backend, shards=1)
    shards = []
    for number, (start, end) in enumerate(bounds):
        part = GalleryIndex(gallery.embeddings[start:end], gallery.image_ids[start:end], gallery.model_fingerprint,
                            locations=gallery.locations[start:end], source={**gallery.source, "rows": [start, end]},
                            thumbnails=gallery.thumbnails[start:end], fusion_score=gallery.fusion_score)
        shards.append(write_index(part, directory / shard_name(number), one))
    write_images(directory / IMAGES_FILE, gallery.image_ids, gallery.locations, gallery.thumbnails)
    meta = write_sharded_meta(directory, backend.kind, bounds, gallery.model_fingerprint, gallery.fusion_score,
                              gallery.source)
    return ShardedIndex(shards, meta["offsets"], gallery.model_fingerprint, gallery.fusion_score)
