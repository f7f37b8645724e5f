"""What kind of query each query of a synthetic CIRR root is: its edit type, edit family, direction and scene root.

The detail benchmark v2 (``synthetic_detail``) writes these as keys of every caption record
(``captions/cap.rc2.<split>.json``, test1 included): ``edit_type`` (e.g. "recolour", "background", "mirror"),
``edit_family`` ("local": one shape changes; "global": the whole scene changes), ``direction`` ("forward": the
edit moves away from the scene root; "inverse": it restores the root's value) and ``scene_root`` (an int, the root
scene the query's images derive from; roots are disjoint across splits, so a bootstrap over roots resamples
independent clusters). Benchmark v1 (``synthetic_bench``) has only ``synthetic/edit_types.<split>.json``: its
queries read as family "local", direction None, scene root None. Real CIRR records carry none of them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

FAMILIES = ("local", "global")
DIRECTIONS = ("forward", "inverse")
TAG_KEYS = ("edit_type", "edit_family", "direction", "scene_root")


@dataclass(frozen=True)
class QueryTag:
    edit_type: str | None
    edit_family: str | None  # one of FAMILIES
    direction: str | None  # one of DIRECTIONS
    scene_root: int | None


def read_query_tags(root: str | Path, split: str) -> dict[str, QueryTag]:
    """{sample_id ("cirr/<split>/<pairid>"): QueryTag} of a CIRR-format root's split; {} when it has no tags."""
    root = Path(root)
    captions = root / "captions" / f"cap.rc2.{split}.json"
    records = json.loads(captions.read_text()) if captions.is_file() else []
    tags = {f"cirr/{split}/{r['pairid']}": QueryTag(r.get("edit_type"), r.get("edit_family"), r.get("direction"),
                                                     r.get("scene_root"))
            for r in records if "edit_type" in r}
    if tags:
        return tags
    legacy = root / "synthetic" / f"edit_types.{split}.json"
    if legacy.is_file():  # benchmark v1: local edits only, no direction or root on record
        return {f"cirr/{split}/{pairid}": QueryTag(kind, "local", None, None)
                for pairid, kind in json.loads(legacy.read_text()).items()}
    return {}
