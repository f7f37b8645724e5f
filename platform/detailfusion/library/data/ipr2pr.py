"""Reader of IPr2Pr (InstructPix2Pix ``instructpix2pix-clip-filtered``) parquet shards (no Ray: the prepare job streams them with
Ray Data and maps ``to_triplets`` over the batches).

Columns: ``original_prompt, original_image{bytes,path}, edit_prompt, edited_prompt, edited_image{bytes,path}``.
A row becomes a triplet (original image, edit prompt, edited image) whose two images travel inline, decoded
and transformed, as uint8 [S, S, 3] stored as one binary value each (schema.py); ``sample_id`` is a content hash (the shards have no ids).
The prompts that made the two images are kept as their captions (``reference_caption``, ``target_caption``; null
when a shard lacks them): the image-text pairs of stage 0's Q-Former pre-training.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from detailfusion.library.data.images import BadImage, load_pixels
from detailfusion.library.data.schema import (
    TRIPLET_SCHEMA,
    Quarantined,
    normalize_text,
    pixels_to_arrow,
    write_quarantine_part,
)
from detailfusion.library.errors import DataError

REQUIRED_COLUMNS = ("original_image", "edit_prompt", "edited_image")
CAPTION_COLUMNS = ("original_prompt", "edited_prompt")  # optional: the images' captions


def ipr2pr_files(root: Path) -> list[Path]:
    files = sorted((root / "data").glob("*.parquet")) or sorted(root.glob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"no IPr2Pr parquet shards under {root}/data/ or {root}/")
    for path in files:
        try:
            names = pq.read_schema(path).names
        except (pa.ArrowInvalid, OSError) as exc:
            raise DataError(f"{path}: not a readable parquet file ({exc})") from None
        missing = [c for c in REQUIRED_COLUMNS if c not in names]
        if missing:
            raise DataError(f"{path}: missing IPr2Pr column(s) {', '.join(missing)} (has {', '.join(names)})")
    return files


def columns(files: list[Path]) -> list[str]:
    """The columns ``to_triplets`` reads: the required ones and the captions every shard has."""
    return list(REQUIRED_COLUMNS) + [c for c in CAPTION_COLUMNS if all(c in pq.read_schema(f).names for f in files)]


def to_triplets(batch: pa.Table, image_size: int, split: str, parts_dir: str) -> pa.Table:
    """Ray Data batch function: raw IPr2Pr rows -> canonical triplet columns + inline pixels."""
    rows, references, targets, captions, bad = [], [], [], [], []
    seen: set[str] = set()
    for raw in batch.to_pylist():
        original, edited = raw.get("original_image") or {}, raw.get("edited_image") or {}
        before, after = original.get("bytes") or b"", edited.get("bytes") or b""
        sample_id = "ipr2pr/" + hashlib.sha1(before + b"\0" + str(raw.get("edit_prompt")).encode() + b"\0" + after).hexdigest()[:20]
        source = raw.get("path", "?")
        text = normalize_text(raw.get("edit_prompt") or "")
        if not text:
            bad.append(Quarantined(source, sample_id, "empty edit_prompt"))
            continue
        if sample_id in seen:
            bad.append(Quarantined(source, sample_id, f"duplicate row {sample_id}"))
            continue
        seen.add(sample_id)
        pixels = {}
        for column, data in (("original_image", before), ("edited_image", after)):
            try:
                pixels[column] = load_pixels(data, image_size)
            except BadImage as exc:
                bad.append(Quarantined(source, sample_id, f"{column}: {exc}", "image"))
                break
        if len(pixels) < 2:
            continue
        ref, tgt = pixels["original_image"], pixels["edited_image"]
        references.append(ref)
        targets.append(tgt)
        captions.append([normalize_text(raw[c]) if raw.get(c) else None for c in CAPTION_COLUMNS])
        rows.append(
            dict(sample_id=sample_id, dataset="ipr2pr", split=split, reference_id=f"{sample_id}:original",
                 target_id=f"{sample_id}:edited", text=text, text_variants=[text], subset_ids=[], category=None)
        )
    if bad:
        write_quarantine_part(parts_dir, (rows[0]["sample_id"] if rows else bad[0].record), bad)
    table = pa.Table.from_pylist(rows, schema=TRIPLET_SCHEMA)
    for i, name in enumerate(("reference_caption", "target_caption")):
        table = table.append_column(name, pa.array([c[i] for c in captions], pa.string()))
    table = table.append_column("reference_pixels", pixels_to_arrow(references, image_size))
    return table.append_column("target_pixels", pixels_to_arrow(targets, image_size))
