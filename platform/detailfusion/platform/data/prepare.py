"""The ``prepare`` job: a Ray Data pipeline from a raw dataset split to canonical parquet shards.

Output directory::

    triplets/       canonical triplet rows (schema.py); IPr2Pr rows also carry their two images inline
    images/         CIRR / FashionIQ: one row per gallery image: image_id, pixels (one binary value: uint8 [S, S, 3])
    gallery.parquet canonical gallery rows of the images that decoded
    features/       optional frozen-ViT cache: image_id, features float16 [T, W]   (--cache-vision-features)
    quarantine.jsonl  every record set aside: source file, record, reason, kind
    manifest.json   counts, schema version, source, config hash; written last, only when the job succeeded

Images are decoded, validated (corrupt, truncated, not an image, oversized) and transformed (targetpad,
bicubic resize, centre crop) inside Ray Data ``map_batches``; bad ones are quarantined, with every triplet
that needs them. More than ``max_bad_fraction`` of records quarantined fails the job after the quarantine
file is written, so nothing already found is lost.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from detailfusion.library.config import PrepareConfig
from detailfusion.library.data.images import BadImage, load_pixels
from detailfusion.library.data.manifest import FILE as MANIFEST_FILE
from detailfusion.library.data.manifest import Manifest
from detailfusion.library.data.reading import ReadResult
from detailfusion.library.data.schema import (
    GALLERY_SCHEMA,
    PIXEL_FORMAT,
    SCHEMA_VERSION,
    TRIPLET_SCHEMA,
    Quarantined,
    pixels_to_arrow,
    write_quarantine_part,
)
from detailfusion.library.errors import DataError

if TYPE_CHECKING:
    from detailfusion.library.datasets import Dataset

QUARANTINE_PARTS = "_quarantine_parts"
PARQUET_COMPRESSION = "lz4"  # raw pixels: lz4 wrote 1.8x faster than none and 13x faster than snappy (benchmarks/ingest.py)


def _block_count(items: int, batch_size: int) -> int:
    """About four blocks per cluster CPU (parallelism) but no block smaller than one batch."""
    import ray

    cpus = int(ray.cluster_resources().get("CPU", 1))
    return max(1, min(-(-items // batch_size), max(4 * cpus, -(-items // 1024))))


class PrepareError(DataError, RuntimeError):
    """The job could not produce a usable output (e.g. too many bad records)."""


def resolve_image_size(config: PrepareConfig) -> int:
    if config.image_size is not None:
        return config.image_size
    from detailfusion.library.model.backbone import (
        load_preset,  # torch + transformers: not in the Ray Data workers, which import this module
    )

    return int(load_preset(config.preset)["image_size"])


def config_hash(config: PrepareConfig, image_size: int) -> str:
    fields = {k: v for k, v in asdict(config).items() if k in ("dataset", "split", "categories")}
    fields.update(root=str(Path(config.root).resolve()), image_size=image_size, schema_version=SCHEMA_VERSION)
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def prepare(config: PrepareConfig) -> Manifest:
    """Run the job; returns the split's manifest. Reuses an existing output with the same config hash."""
    from detailfusion.platform.ray_setup import init_ray

    if not config.root or not config.out:
        raise PrepareError("prepare needs both root (the dataset directory) and out (the output directory)")
    root, out = Path(config.root), Path(config.out)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset root {root} does not exist or is not a directory")
    image_size = resolve_image_size(config)
    digest = config_hash(config, image_size)
    if (out / MANIFEST_FILE).is_file():
        try:
            manifest = Manifest.read(out)
        except DataError:  # written by another version of prepare: made again below
            manifest = None
        if manifest and manifest.config_hash == digest and (not config.cache_vision_features or manifest.features):
            print(f"prepare: {out} already holds this split (config {digest}); reusing it")
            return manifest
    for stale in ("triplets", "images", "features", "gallery.parquet", QUARANTINE_PARTS, "quarantine.jsonl", MANIFEST_FILE):
        path = out / stale
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    init_ray(config.num_cpus)
    start = time.perf_counter()
    print(f"prepare: {config.dataset}/{config.split} from {root} -> {out} ({image_size} px)", flush=True)
    from detailfusion.library.datasets import dataset  # the protocols' torch stays out of Ray Data's workers

    source = dataset(config.dataset, "prepare.dataset")
    if source.layout == "inline":
        counts, bad, warnings = _prepare_inline(source, root, out, config, image_size)
    else:
        counts, bad, warnings = _prepare_gallery(source, root, out, config, image_size)
    _write_quarantine(out, bad)
    fraction = counts["quarantined_records"] / max(1, counts["records_read"])
    images = f", {counts['images']} images" if "images" in counts else ""
    print(
        f"prepare: kept {counts['triplets']} triplets{images}; "
        f"{len(bad)} quarantined ({fraction:.2%} of {counts['records_read']} records) -> {out / 'quarantine.jsonl'}"
    )
    for reason, n in _reason_summary(bad):
        print(f"  {n:6d} x {reason}")
    for line in warnings[:10]:
        print(f"  warning: {line}")
    unreadable = [b for b in bad if b.kind == "file"]
    if unreadable:
        raise PrepareError(
            "cannot use " + "; ".join(f"{b.source} ({b.reason})" for b in unreadable) + f"; see {out / 'quarantine.jsonl'}"
        )
    if counts["triplets"] == 0:
        raise PrepareError(f"no usable triplets in {root} split {config.split!r}; see {out / 'quarantine.jsonl'}")
    if fraction > config.max_bad_fraction:
        raise PrepareError(
            f"{fraction:.2%} of records were quarantined, above max_bad_fraction={config.max_bad_fraction:.2%}; "
            f"see {out / 'quarantine.jsonl'} (raise --max-bad-fraction to accept them)"
        )
    manifest = Manifest(
        schema_version=SCHEMA_VERSION, dataset=config.dataset, split=config.split, source=str(root.resolve()),
        image_size=image_size, pixel_format=PIXEL_FORMAT, config_hash=digest, counts=counts, warnings=warnings,
        layout=source.layout, features=None,
        seconds=round(time.perf_counter() - start, 2))
    if config.cache_vision_features:
        from detailfusion.platform.data.feature_cache import cache_vision_features

        manifest = dataclasses.replace(manifest, features=cache_vision_features(out, manifest, config))
    manifest.write(out)  # last: a split without its manifest is unfinished
    return manifest


# -- gallery layout (CIRR, FashionIQ): annotations + a folder of image files ------------------------------------------


def _load_images(batch: dict[str, np.ndarray], root: str, image_size: int, parts_dir: str) -> pa.Table:
    """Ray Data batch function: gallery rows -> image_id + pixels (one binary value per image, schema.py); bad
    images go to a quarantine part file."""
    ids, pixels, bad = [], [], []
    for image_id, location in zip(batch["image_id"], batch["location"]):
        path = Path(root) / location
        try:
            pixels.append(load_pixels(path.read_bytes(), image_size))
            ids.append(image_id)
        except FileNotFoundError:
            bad.append(Quarantined(str(path), image_id, "image file not found", "image"))
        except (BadImage, OSError) as exc:
            bad.append(Quarantined(str(path), image_id, str(exc), "image"))
    if bad:
        write_quarantine_part(parts_dir, str(batch["image_id"][0]), bad)
    return pa.table({"image_id": pa.array([str(i) for i in ids], pa.string()),
                     "pixels": pixels_to_arrow(pixels, image_size)})


def _prepare_gallery(source: Dataset, root: Path, out: Path, config: PrepareConfig, image_size: int):
    import ray

    read: ReadResult = source.read(root, config.split, config.categories or source.categories)
    unique = list({row["image_id"]: row for row in read.gallery}.values())
    print(f"prepare: read {len(read.triplets)} triplets, {len(unique)} images to decode", flush=True)
    parts = out / QUARANTINE_PARTS
    parts.mkdir(parents=True, exist_ok=True)
    bad_images: list[Quarantined] = []
    if unique:
        items = [{"image_id": r["image_id"], "location": r["location"]} for r in unique]
        (
            ray.data.from_items(items, override_num_blocks=_block_count(len(items), config.batch_size))
            .map_batches(
                _load_images,
                fn_kwargs={"root": str(root), "image_size": image_size, "parts_dir": str(parts)},
                batch_size=config.batch_size,
                batch_format="numpy",
            )
            .write_parquet(str(out / "images"), compression=PARQUET_COMPRESSION)
        )
        bad_images = _collect_parts(parts)
    shutil.rmtree(parts, ignore_errors=True)
    broken = {b.record: b.reason for b in bad_images}
    triplets, bad, warnings = [], list(read.bad) + bad_images, list(read.warnings)
    for row in read.triplets:
        needed = [row["reference_id"]] + ([row["target_id"]] if row["target_id"] else [])
        lost = [i for i in needed if i in broken]
        if lost:
            reason = "; ".join(f"image {i} quarantined ({broken[i]})" for i in lost)
            bad.append(Quarantined(row["sample_id"], row["sample_id"], reason))
            continue
        members = [m for m in row["subset_ids"] if m not in broken]
        if len(members) < len(row["subset_ids"]):
            warnings.append(f"{row['sample_id']}: subset member(s) dropped with their quarantined images")
            row = {**row, "subset_ids": members}
        triplets.append(row)
    (out / "triplets").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(triplets, schema=TRIPLET_SCHEMA), out / "triplets" / "part-00000.parquet")
    gallery = [r for r in read.gallery if r["image_id"] not in broken]
    pq.write_table(pa.Table.from_pylist(gallery, schema=GALLERY_SCHEMA), out / "gallery.parquet")
    records_read = len(read.triplets) + len(unique) + len(read.bad)
    counts = {
        "records_read": records_read,
        "triplets": len(triplets),
        "images": len(unique) - len(bad_images),
        "gallery_rows": len(gallery),
        "quarantined_records": len(bad),
    }
    return counts, bad, warnings


# -- inline layout (IPr2Pr): parquet shards with both images inline ------------------------------------------------------


def _prepare_inline(source: Dataset, root: Path, out: Path, config: PrepareConfig, image_size: int):
    import ray

    parts = out / QUARANTINE_PARTS
    parts.mkdir(parents=True, exist_ok=True)
    files = source.files(root)
    rows = ray.data.read_parquet([str(f) for f in files], include_paths=True).select_columns(
        source.columns(files) + ["path"])  # projected into the scan by Ray Data's optimizer
    print(f"prepare: streaming {len(files)} {config.dataset} parquet shard(s)", flush=True)
    (
        rows.map_batches(
            source.to_triplets,
            fn_kwargs={"image_size": image_size, "split": config.split, "parts_dir": str(parts)},
            batch_size=config.batch_size,
            batch_format="pyarrow",
        ).write_parquet(str(out / "triplets"), compression=PARQUET_COMPRESSION)
    )
    bad = _collect_parts(parts) + _drop_repeated_rows(out / "triplets")
    shutil.rmtree(parts, ignore_errors=True)
    kept = sum(pq.read_metadata(p).num_rows for p in (out / "triplets").glob("*.parquet"))
    counts = {"records_read": kept + len(bad), "triplets": kept, "quarantined_records": len(bad)}
    return counts, bad, []


def _drop_repeated_rows(triplets: Path) -> list[Quarantined]:
    """Rows repeated across batches or shards (each batch drops its own repeats): the first in file order is kept,
    the files holding a later copy are rewritten without it. Reads only the sample_id column of the rest."""
    seen: set[str] = set()
    bad = []
    for path in sorted(triplets.glob("*.parquet")):
        ids = pq.read_table(path, columns=["sample_id"]).column("sample_id").to_pylist()
        repeated = []
        for i, sample_id in enumerate(ids):
            if sample_id in seen:
                repeated.append(i)
            seen.add(sample_id)
        if repeated:
            table = pq.read_table(path)
            pq.write_table(table.take(sorted(set(range(len(ids))) - set(repeated))), path,
                           compression=PARQUET_COMPRESSION)
            bad += [Quarantined(f"{triplets.name}/{path.name}", ids[i], f"duplicate row {ids[i]} (another batch or "
                                "shard holds it)") for i in repeated]
    return bad


# -- quarantine ------------------------------------------------------------------------------------------


def _collect_parts(parts: Path) -> list[Quarantined]:
    found = []
    for part in sorted(parts.glob("*.jsonl")):
        found += [Quarantined(**json.loads(line)) for line in part.read_text().splitlines() if line]
    return found


def _write_quarantine(out: Path, bad: list[Quarantined]) -> None:
    (out / "quarantine.jsonl").write_text("".join(json.dumps(b.to_dict()) + "\n" for b in bad))


def _reason_summary(bad: list[Quarantined]) -> list[tuple[str, int]]:
    counts: dict[str, int] = {}
    for b in bad:
        key = b.reason.split(":")[0]
        counts[key] = counts.get(key, 0) + 1
    return sorted(counts.items(), key=lambda kv: -kv[1])


def read_quarantine(out: str | Path) -> list[dict]:
    path = Path(out) / "quarantine.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.is_file() else []
