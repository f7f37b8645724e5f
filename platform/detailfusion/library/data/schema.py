"""Canonical rows every reader produces, whatever the source format (pyarrow schemas + the quarantine record).

Triplet: one query (reference image + text) and its target; ``target_id`` is null for unlabelled test splits.
``text`` is the evaluation form; ``text_variants`` the forms training samples from (FashionIQ: four).
``subset_ids``: the query's near-duplicate set (CIRR ``img_set.members``), empty elsewhere.
Gallery: one image; ``location`` is a path relative to the dataset root, or ``<parquet file>#<row>/<column>``
for images stored inside parquet shards (IPr2Pr).
Pixels (``PIXEL_FORMAT``): each prepared image is ONE fixed-size binary value of S*S*3 bytes, its uint8
[S, S, 3] array row-major (``pixels_to_arrow`` / ``pixels_from_bytes``). Schema version 1 stored Ray tensor
columns (``list<uint8>``: 150,528 parquet values per 224 px image, whose write cost more than decode + resize).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from detailfusion.library.errors import DataError

SCHEMA_VERSION = 3  # 3: IPr2Pr rows keep their images' captions; 2: pixels as one fixed-size binary value per
#   image (1: Ray tensor columns)
PIXEL_FORMAT = "one fixed_size_binary(S*S*3) value per image: uint8 [S, S, 3] row-major (RGB)"

TRIPLET_SCHEMA = pa.schema(
    [
        ("sample_id", pa.string()),
        ("dataset", pa.string()),
        ("split", pa.string()),
        ("reference_id", pa.string()),
        ("target_id", pa.string()),
        ("text", pa.string()),
        ("text_variants", pa.list_(pa.string())),
        ("subset_ids", pa.list_(pa.string())),
        ("category", pa.string()),
    ]
)

GALLERY_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("dataset", pa.string()),
        ("split", pa.string()),
        ("location", pa.string()),
        ("category", pa.string()),
    ]
)


@dataclass(frozen=True)
class Quarantined:
    """One bad record: where it came from, which record, and why it was set aside."""

    source: str  # file the record came from
    record: str  # index or id within that file
    reason: str
    kind: str = "triplet"  # triplet | image | file

    def to_dict(self) -> dict:
        return asdict(self)


def write_quarantine_part(parts_dir: str, key: str, bad: list[Quarantined]) -> None:
    """One Ray Data batch's bad records as ``parts_dir/<sha1(key)>.jsonl``; ``key`` names the batch (its first
    id), so a retried task overwrites its own part instead of duplicating it."""
    name = hashlib.sha1(key.encode()).hexdigest()
    (Path(parts_dir) / f"{name}.jsonl").write_text("".join(json.dumps(b.to_dict()) + "\n" for b in bad))


def normalize_text(text: str) -> str:
    """Lower-case, drop punctuation but for ``' - &`` (kept inside words), collapse whitespace."""
    text = re.sub(r"[^\w\s'&-]", " ", text.lower())
    return " ".join(text.split())


# -- pixels: one binary value per image --------------------------------------------------------------------


def pixel_type(size: int) -> pa.DataType:
    """The Arrow type of one ``size`` x ``size`` RGB image: fixed_size_binary(size * size * 3)."""
    return pa.binary(size * size * 3)


def pixels_to_arrow(images: list[np.ndarray], size: int) -> pa.Array:
    """uint8 [S, S, 3] arrays -> one fixed-size binary value each (their row-major bytes)."""
    for image in images:
        if image.shape != (size, size, 3) or image.dtype != np.uint8:
            raise ValueError(f"expected uint8 pixels {(size, size, 3)}, got {image.dtype} {image.shape}")
    return pa.array([image.tobytes() for image in images], type=pixel_type(size))


def pixels_from_bytes(values, size: int | None = None) -> np.ndarray:
    """Stored pixels -> uint8 [N, S, S, 3], with one ``np.frombuffer`` over the values' joined bytes.

    ``values``: an Arrow (chunked) fixed-size binary column, as read from parquet (decoded without a copy: the
    array is read-only and keeps the Arrow buffer alive), or a sequence of ``bytes`` (a Ray Data numpy batch
    gives an object array of them; decoded into a fresh writable array). ``size`` (S) is taken from the value
    length when not given.
    """
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks() if values.num_chunks != 1 else values.chunk(0)
    if isinstance(values, pa.Array):
        if pa.types.is_fixed_size_binary(values.type) and values.null_count == 0:
            width = values.type.byte_width
            data = values.buffers()[1]
            flat = np.frombuffer(data, dtype=np.uint8, count=len(values) * width, offset=values.offset * width) \
                if len(values) else np.zeros(0, dtype=np.uint8)
            return _reshape(flat, len(values), width, size)
        if not (pa.types.is_binary(values.type) or pa.types.is_large_binary(values.type)
                or pa.types.is_fixed_size_binary(values.type)):
            raise DataError(f"pixels stored as {values.type}, not one binary value per image: an output of an older "
                             f"schema version (now {SCHEMA_VERSION}); run `detailfusion prepare` on the split again")
        values = values.to_pylist()
    values = list(values)
    if any(v is None for v in values):
        raise ValueError("missing pixels (null values)")
    width = len(values[0]) if values else (size * size * 3 if size else 0)
    if any(len(v) != width for v in values):
        raise ValueError("pixel values of different lengths in one column")
    flat = np.frombuffer(bytearray().join(values), dtype=np.uint8)  # bytearray: writable, one copy
    return _reshape(flat, len(values), width, size)


def _reshape(flat: np.ndarray, count: int, width: int, size: int | None) -> np.ndarray:
    if size is None:
        size = int(round((width / 3) ** 0.5))
    if size * size * 3 != width:
        raise ValueError(f"pixel values of {width} bytes are not {size} x {size} x 3 uint8 images")
    return flat.reshape(count, size, size, 3)
