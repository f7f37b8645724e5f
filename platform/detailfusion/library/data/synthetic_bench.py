"""The "detail" synthetic CIRR benchmark: families of sibling groups, so that only the text decides.

A family is a root scene of 4-5 shapes, one of them the *pivot*, and ``family_size`` groups (CIRR ``img_set``s of
6 images). Group k's base is the root with the pivot replaced by another kind/colour/size in the same cell; its 5
variants apply edits from one pool shared by the family (one edit per type, none touching the pivot). So the
reference's pixel neighbourhood holds the other groups' bases (one shape differs) and their copies of the same
edit (the target but for the pivot), all with the family's background: every image outside the target's
img_set in its family shares its non-pivot shapes (at least 2, kind and colour) with the target. Families are
written whole; the last one of a split may hold groups without queries (gallery only).
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from detailfusion.library.data.synthetic_scenes import (
    CIRR_PAIRS_PER_SET,
    COLOURS,
    EDIT_TYPES,
    KINDS,
    Edit,
    Group,
    Scene,
    Shape,
    random_edit,
    random_scene,
    write_cirr_groups,
)
from detailfusion.library.errors import ConfigError

VARIANTS = 5  # single-edit variants per group: img_set = base + 5


@dataclass(frozen=True)
class DetailLayout:
    """Query counts per split and the family shape of the detail benchmark."""

    train_pairs: int
    val_pairs: int = 500
    test_pairs: int = 2000
    family_size: int = 24  # groups (img_sets) per family
    pairs_per_set: int = 5  # queries per img_set, of its 10 forward/inverse pairs

    def __post_init__(self):
        for name in ("train_pairs", "val_pairs", "test_pairs"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 2 <= self.family_size <= 64:
            raise ConfigError(f"family_size must be in 2..64 (groups per family), got {self.family_size}")
        if not 1 <= self.pairs_per_set <= CIRR_PAIRS_PER_SET:
            raise ConfigError(f"pairs_per_set must be in 1..{CIRR_PAIRS_PER_SET}, got {self.pairs_per_set}")

    @property
    def counts(self) -> dict[str, int]:
        return {"train": self.train_pairs, "val": self.val_pairs, "test1": self.test_pairs}


class FamilyFactory:
    """Makes families of groups whose scenes never repeat (across all splits of one dataset)."""

    def __init__(self, rng: random.Random, family_size: int):
        self.rng, self.family_size, self.seen = rng, family_size, set()

    def family(self) -> list[Group]:
        while True:
            root = random_scene(self.rng, count=(4, 5))
            pivot = self.rng.choice(root.shapes)
            pool = self._edit_pool(root, pivot)
            if len(pool) < VARIANTS:
                continue
            others = tuple(s for s in root.shapes if s != pivot)
            taken = {(s.kind, s.colour) for s in others}
            pivots = [Shape(k, c, "small", pivot.cell) for k in KINDS for c in COLOURS if (k, c) not in taken]
            self.rng.shuffle(pivots)
            groups, keys = [], set()
            for shape in pivots:
                base = Scene(root.background, others + (shape,))
                edits = [e for e in self.rng.sample(pool, len(pool)) if _keeps_names_unique(e, base)][:VARIANTS]
                scene_keys = {base.key()} | {e.apply(base).key() for e in edits}
                if len(edits) < VARIANTS or len(scene_keys) < VARIANTS + 1 or scene_keys & keys or scene_keys & self.seen:
                    continue
                keys |= scene_keys
                groups.append(Group.of(base, edits, self.rng))
                if len(groups) == self.family_size:
                    self.seen |= keys
                    return groups

    def _edit_pool(self, root: Scene, pivot: Shape) -> list[Edit]:
        """One edit per type (where the root allows one) that neither touches the pivot nor takes its cell. The
        removed shape is not the resized one: "put a red circle at the top" (no size) would name two targets."""
        pool = []
        for edit_type in EDIT_TYPES:
            for _ in range(20):
                edit = random_edit(self.rng, root, edit_type)
                if edit is None or edit.before == pivot or (edit.after is not None and edit.after.cell == pivot.cell):
                    continue
                if edit.type in ("remove", "resize") and any(e.before == edit.before for e in pool if e.type in ("remove", "resize")):
                    continue
                pool.append(edit)
                break
        return pool


def _keeps_names_unique(edit: Edit, scene: Scene) -> bool:
    """After ``edit``, "the red circle" still names one shape of ``scene``."""
    names = [(s.kind, s.colour) for s in edit.apply(scene).shapes]
    return len(names) == len(set(names))


def write_cirr_detail(out: Path, layout: DetailLayout, seed: int, image_size: int = 128) -> dict[str, int]:
    """The detail benchmark in CIRR's on-disk layout (see write_cirr_groups); returns queries per split."""
    rng = random.Random(seed)
    factory = FamilyFactory(rng, layout.family_size)

    def groups(queries: int) -> Iterator[Group]:
        for _ in range(math.ceil(queries / (layout.pairs_per_set * layout.family_size))):
            yield from factory.family()

    split_groups = {split: groups(n) for split, n in layout.counts.items()}
    return write_cirr_groups(out, split_groups, layout.counts, layout.pairs_per_set, rng, image_size)
