"""Canonical rows every reader produces, whatever the source format (pyarrow schemas + the quarantine record).

Triplet: one query (reference image + text) and its target; ``target_id`` is null for unlabelled test splits.
``text`` is the evaluation form; ``text_variants`` the forms training samples from (FashionIQ: four).
``subset_ids``: the query's near-duplicate set (CIRR ``img_set.members``), empty elsewhere.
Gallery: one image; ``location`` is a path relative to the dataset root, or ``<parquet file>#<row>/<column>``
for images stored inside parquet shards (IPr2Pr).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from dataclasses import asdict, dataclass

import pyarrow as pa

SCHEMA_VERSION = 1

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
