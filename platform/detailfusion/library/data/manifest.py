"""The prepared split's record (``manifest.json``, written last by ``prepare``): what the split holds and how it
was made. Read by training, validation, evaluation and the index as a typed ``Manifest``, never as a dict."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from detailfusion.library.errors import DataError

FILE = "manifest.json"


@dataclass(frozen=True)
class Manifest:
    schema_version: int
    dataset: str  # a registered dataset (library/datasets.py)
    split: str
    source: str  # the dataset root it was prepared from (absolute)
    image_size: int  # pixels per side of the stored uint8 images
    pixel_format: str
    config_hash: str  # of the PrepareConfig fields that shape the output (a rerun with the same hash reuses it)
    counts: dict[str, int]  # records_read, triplets, images, quarantined_records, ...
    layout: Literal["gallery", "inline"]  # gallery: triplets name images of gallery.parquet; inline: rows carry them
    warnings: list[str] = field(default_factory=list)  # kept records the reader flagged (e.g. blank captions)
    features: dict[str, Any] | None = None  # the ViT feature cache: {"fingerprint", "shape", ...}, None without one
    seconds: float = 0.0  # the prepare job's wall time

    @property
    def triplets(self) -> int:
        return self.counts["triplets"]

    @classmethod
    def read(cls, prepared_dir: str | Path) -> Manifest:
        path = Path(prepared_dir) / FILE
        if not path.is_file():
            raise FileNotFoundError(f"{prepared_dir}: no {FILE}; run `detailfusion prepare` for this split first")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: not valid JSON ({exc}); run `detailfusion prepare` for this split again") from exc
        known = {f.name for f in dataclasses.fields(cls)}
        missing = sorted(f.name for f in dataclasses.fields(cls)
                         if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
                         and f.name not in raw)
        if missing or set(raw) - known:
            raise DataError(f"{path}: {'missing ' + ', '.join(missing) if missing else ''}"
                            f"{'; ' if missing and set(raw) - known else ''}"
                            f"{'unknown ' + ', '.join(sorted(set(raw) - known)) if set(raw) - known else ''}: written by "
                            "another version of `prepare`; run it for this split again")
        return cls(**raw)

    def write(self, prepared_dir: str | Path) -> None:
        (Path(prepared_dir) / FILE).write_text(json.dumps(dataclasses.asdict(self), indent=1))


def read_manifest(prepared_dir: str | Path) -> Manifest:
    """The prepared split's ``Manifest`` (FileNotFoundError when ``prepare`` has not finished there)."""
    return Manifest.read(prepared_dir)
