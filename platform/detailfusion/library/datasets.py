"""Datasets, registered once by name (``DATASETS``): how ``prepare`` reads one, which stages train on it, how
``evaluate`` and validation score it and write its predictions. A new dataset is one module with its reader and one
``DATASETS.register("name", Dataset(...))``; configs, ``prepare``, training, ``evaluate`` and the CLI find it there.

Two layouts, the two shapes composed image retrieval data comes in:

- ``gallery``: annotations plus a folder of image files (CIRR, FashionIQ). ``read(root, split, categories)`` returns
  the split's canonical triplets and gallery rows (``library/data/reading.py``'s ``ReadResult``, image files named
  by location under the root); ``prepare`` decodes each gallery image once. A ``protocol`` scores it.
- ``inline``: parquet shards holding both images of each row (IPr2Pr). ``files(root)`` lists (and checks) the
  shards, ``columns(files)`` the columns to read, ``to_triplets(batch, image_size, split, parts_dir)`` maps one
  pyarrow batch to canonical rows with inline pixels (a Ray Data batch function: it must pickle).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

from detailfusion.library.data import cirr, fashioniq, ipr2pr
from detailfusion.library.data.query_tags import read_query_tags
from detailfusion.library.data.reading import ReadResult
from detailfusion.library.errors import ConfigError
from detailfusion.library.eval.protocols import CirrProtocol, FashionIQProtocol, Protocol
from detailfusion.library.registry import Registry


@dataclass(frozen=True)
class Dataset:
    """layout: "gallery" (``read``) or "inline" (``files``, ``columns``, ``to_triplets``); see the module's text.

    protocol: how a split is scored and its predictions written; None: a training corpus only (no gallery).
    categories: the dataset's categories (FashionIQ's garments), the default of every config's ``categories``.
    query_tags: (root, split) -> {sample_id: QueryTag} (edit type, family, direction, scene root) where the
        annotations carry them; evaluate reports metrics by tag.
    """

    layout: Literal["gallery", "inline"]
    read: Callable[[Path, str, tuple[str, ...]], ReadResult] | None = None
    files: Callable[[Path], list[Path]] | None = None
    columns: Callable[[list[Path]], list[str]] | None = None
    to_triplets: Callable | None = None
    protocol: Protocol | None = None
    categories: tuple[str, ...] = ()
    query_tags: Callable[[str | Path, str], dict] | None = None

    def __post_init__(self):
        needs = ("read",) if self.layout == "gallery" else ("files", "columns", "to_triplets")
        missing = [name for name in needs if getattr(self, name) is None]
        if missing:
            raise ValueError(f"a {self.layout}-layout dataset needs {', '.join(missing)}")
        if self.protocol is not None and self.layout != "gallery":
            raise ValueError("only a gallery-layout dataset can have an evaluation protocol")


DATASETS: Registry[Dataset] = Registry("dataset", __name__)


def dataset(name: str, where: str = "dataset") -> Dataset:
    return DATASETS.get(name, where)


def evaluable(name: str, where: str = "dataset") -> Dataset:
    """The dataset ``name``, refused when it has no evaluation protocol."""
    found = dataset(name, where)
    if found.protocol is None:
        scored = [n for n in DATASETS.names() if DATASETS.get(n).protocol is not None]
        raise ConfigError(f"{where}: {name!r} has no evaluation protocol (a training corpus); evaluable: "
                          f"{', '.join(scored)}")
    return found


def _read_cirr(root: Path, split: str, categories: tuple[str, ...]) -> ReadResult:
    return cirr.read_cirr(root, split)


DATASETS.register("cirr", Dataset("gallery", read=_read_cirr, protocol=CirrProtocol(), query_tags=read_query_tags))
DATASETS.register("fashioniq", Dataset("gallery", read=fashioniq.read_fashioniq, protocol=FashionIQProtocol(),
                                       categories=fashioniq.CATEGORIES))
DATASETS.register("ipr2pr", Dataset("inline", files=ipr2pr.ipr2pr_files, columns=ipr2pr.columns,
                                    to_triplets=ipr2pr.to_triplets))
