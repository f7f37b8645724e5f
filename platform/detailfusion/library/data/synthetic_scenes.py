"""Procedural composed-image-retrieval data: scenes of coloured shapes and one atomic edit per pair.

A scene is a few shapes (kind, colour, size, grid cell) on a plain background; an edit recolours, reshapes,
adds, removes, moves or resizes one shape and is described in natural text with several phrasings.
``write_cirr`` / ``write_fashioniq`` / ``write_ipr2pr`` write the data **in the real datasets' on-disk formats**
(CIRR, FashionIQ, IPr2Pr; see METHOD.md "Data formats"), so the real readers run on it unchanged;
``synthetic.write_synthetic`` is the front of these writers and of the detail benchmark (``synthetic_bench``).
Everything is deterministic by seed; no scene is shared between splits.
"""

from __future__ import annotations

import io
import json
import math
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from PIL import Image, ImageDraw

from detailfusion.library.data.fashioniq import CATEGORIES

KINDS = ("circle", "square", "triangle", "star", "diamond", "cross")
COLOURS = {
    "red": (215, 40, 40),
    "green": (40, 165, 60),
    "blue": (40, 80, 215),
    "yellow": (235, 205, 35),
    "purple": (135, 55, 175),
    "orange": (240, 135, 30),
    "white": (248, 248, 248),
    "black": (25, 25, 25),
}
SIZES = {"small": 0.10, "large": 0.17}  # radius as a fraction of the image side
CELLS = ("top left", "top", "top right", "left", "centre", "right", "bottom left", "bottom", "bottom right")
EDIT_TYPES = ("recolour", "reshape", "add", "remove", "move", "resize")
FASHIONIQ_CATEGORIES = dict(zip(CATEGORIES, (  # each category draws from its own shapes and background tone
    (("circle", "diamond", "star"), (232, 226, 214)),  # dress
    (("square", "cross", "triangle"), (214, 224, 232)),  # shirt
    (KINDS, (226, 232, 214)),  # toptee
)))


# -- scenes ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    size: str
    cell: int  # index into CELLS

    @property
    def name(self) -> str:
        return f"{self.colour} {self.kind}"


@dataclass(frozen=True)
class Scene:
    background: tuple[int, int, int]
    shapes: tuple[Shape, ...]

    def key(self) -> tuple:
        return (self.background, tuple(sorted((s.kind, s.colour, s.size, s.cell) for s in self.shapes)))

    def free_cells(self) -> list[int]:
        used = {s.cell for s in self.shapes}
        return [c for c in range(len(CELLS)) if c not in used]

    def has(self, kind: str, colour: str) -> bool:
        return any(s.kind == kind and s.colour == colour for s in self.shapes)


def random_scene(rng: random.Random, kinds=KINDS, background=None, count: tuple[int, int] = (2, 4)) -> Scene:
    """2-4 shapes, each (colour, kind) and cell used once, so "the red circle" names one shape."""
    shapes: list[Shape] = []
    cells = rng.sample(range(len(CELLS)), rng.randint(*count))
    for cell in cells:
        while True:
            shape = Shape(rng.choice(kinds), rng.choice(list(COLOURS)), rng.choice(list(SIZES)), cell)
            if not any(s.kind == shape.kind and s.colour == shape.colour for s in shapes):
                shapes.append(shape)
                break
    if background is None:
        tone = rng.randint(150, 215)
        background = (tone, tone, tone + rng.randint(-10, 10))
    return Scene(background, tuple(shapes))


# -- edits -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Edit:
    """One atomic change: ``before`` -> ``after`` (None on one side for add / remove)."""

    before: Shape | None
    after: Shape | None

    @property
    def type(self) -> str:
        if self.before is None:
            return "add"
        if self.after is None:
            return "remove"
        if self.before.colour != self.after.colour:
            return "recolour"
        if self.before.kind != self.after.kind:
            return "reshape"
        if self.before.cell != self.after.cell:
            return "move"
        return "resize"

    def inverse(self) -> "Edit":
        return Edit(self.after, self.before)

    def apply(self, scene: Scene) -> Scene:
        shapes = [s for s in scene.shapes if s != self.before]
        if self.after is not None:
            shapes.append(self.after)
        return replace(scene, shapes=tuple(shapes))


def random_edit(rng: random.Random, scene: Scene, edit_type: str, kinds=KINDS) -> Edit | None:
    """An edit of the given type that keeps the scene's names unique, or None if the scene allows none."""
    free = scene.free_cells()
    shape = rng.choice(scene.shapes)
    if edit_type == "recolour":
        options = [c for c in COLOURS if not scene.has(shape.kind, c)]
        return Edit(shape, replace(shape, colour=rng.choice(options))) if options else None
    if edit_type == "reshape":
        options = [k for k in kinds if not scene.has(k, shape.colour)]
        return Edit(shape, replace(shape, kind=rng.choice(options))) if options else None
    if edit_type == "add":
        options = [(k, c) for k in kinds for c in COLOURS if not scene.has(k, c)]
        if not free or not options:
            return None
        kind, colour = rng.choice(options)
        return Edit(None, Shape(kind, colour, rng.choice(list(SIZES)), rng.choice(free)))
    if edit_type == "remove":
        return Edit(shape, None) if len(scene.shapes) > 1 else None
    if edit_type == "move":
        return Edit(shape, replace(shape, cell=rng.choice(free))) if free else None
    if edit_type == "resize":
        return Edit(shape, replace(shape, size="small" if shape.size == "large" else "large"))
    raise ValueError(f"unknown edit type {edit_type!r}; known: {', '.join(EDIT_TYPES)}")


def describe(edit: Edit, rng: random.Random) -> str:
    """One of several natural phrasings of ``edit``, with varied case and punctuation."""
    b, a = edit.before, edit.after
    kind = edit.type
    if kind == "recolour":
        options = [
            f"make the {b.name} {a.colour}",
            f"change the {b.name} to {a.colour}",
            f"the {b.name} should be {a.colour}",
            f"paint the {b.name} {a.colour}",
            f"recolour the {b.name} to {a.colour}",
        ]
    elif kind == "reshape":
        options = [
            f"turn the {b.name} into a {a.kind}",
            f"replace the {b.name} with a {a.name}",
            f"make the {b.name} a {a.kind} instead",
            f"change the {b.kind} that is {b.colour} into a {a.kind}",
        ]
    elif kind == "add":
        where = CELLS[a.cell]
        options = [
            f"add a {a.size} {a.name} at the {where}",
            f"put a {a.name} at the {where}",
            f"insert a {a.size} {a.name} on the {where}",
            f"there should also be a {a.name} at the {where}",
        ]
    elif kind == "remove":
        options = [
            f"remove the {b.name}",
            f"delete the {b.name}",
            f"take away the {b.name}",
            f"get rid of the {b.name}",
            f"no {b.name}",
        ]
    elif kind == "move":
        where = CELLS[a.cell]
        options = [
            f"move the {b.name} to the {where}",
            f"shift the {b.name} to the {where}",
            f"put the {b.name} over at the {where} instead",
            f"the {b.name} should be at the {where}",
        ]
    else:  # resize
        word = "bigger" if a.size == "large" else "smaller"
        verb = "enlarge" if a.size == "large" else "shrink"
        options = [
            f"make the {b.name} {word}",
            f"{verb} the {b.name}",
            f"the {b.name} should be {word}",
            f"a {word} {b.name}",
        ]
    text = rng.choice(options)
    if rng.random() < 0.4:
        text = text[0].upper() + text[1:]
    if rng.random() < 0.3:
        text += "."
    return text


def caption_of(scene: Scene) -> str:
    """A plain description of the whole scene (IPr2Pr's original/edited prompts)."""
    parts = [f"a {s.size} {s.name} at the {CELLS[s.cell]}" for s in sorted(scene.shapes, key=lambda s: s.cell)]
    return ", ".join(parts) + " on a plain background"


# -- rendering ---------------------------------------------------------------------------------------


def render(scene: Scene, size: int = 128) -> Image.Image:
    """Draw the scene as an RGB image of ``size`` x ``size`` pixels."""
    image = Image.new("RGB", (size, size), scene.background)
    draw = ImageDraw.Draw(image)
    for shape in scene.shapes:
        row, col = divmod(shape.cell, 3)
        cx, cy = (col + 0.5) * size / 3, (row + 0.5) * size / 3
        r = SIZES[shape.size] * size
        fill = COLOURS[shape.colour]
        if shape.kind == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif shape.kind == "square":
            draw.rectangle([cx - r * 0.85, cy - r * 0.85, cx + r * 0.85, cy + r * 0.85], fill=fill)
        elif shape.kind == "triangle":
            draw.polygon([(cx, cy - r), (cx - r, cy + r * 0.8), (cx + r, cy + r * 0.8)], fill=fill)
        elif shape.kind == "diamond":
            draw.polygon([(cx, cy - r), (cx + r * 0.75, cy), (cx, cy + r), (cx - r * 0.75, cy)], fill=fill)
        elif shape.kind == "star":
            points = [
                (cx + (r if i % 2 == 0 else r * 0.45) * math.sin(i * math.pi / 5),
                 cy - (r if i % 2 == 0 else r * 0.45) * math.cos(i * math.pi / 5))
                for i in range(10)
            ]
            draw.polygon(points, fill=fill)
        elif shape.kind == "cross":
            w = r * 0.35
            draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
            draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)
    return image


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# -- groups of near-duplicates -----------------------------------------------------------------------


@dataclass
class Group:
    """A base scene and single-edit variants of it: the members of one CIRR ``img_set``.

    pairs: (reference index, target index, edit) into ``scenes``; every forward edit base -> variant and its
    inverse variant -> base.
    """

    scenes: list[Scene]
    pairs: list[tuple[int, int, Edit]]

    @classmethod
    def of(cls, base: Scene, edits: list[Edit], rng: random.Random) -> "Group":
        """``base`` and ``edit(base)`` for each edit; pairs forward and inverse, in an order shuffled by ``rng``."""
        pairs = [(0, i + 1, e) for i, e in enumerate(edits)] + [(i + 1, 0, e.inverse()) for i, e in enumerate(edits)]
        rng.shuffle(pairs)
        return cls([base] + [e.apply(base) for e in edits], pairs)


class SceneFactory:
    """Makes groups whose scenes never repeat (across all splits of one dataset)."""

    def __init__(self, rng: random.Random, kinds=KINDS):
        self.rng, self.kinds, self.seen = rng, kinds, set()

    def group(self, variants: int = 5, background=None) -> Group:
        while True:
            base = random_scene(self.rng, self.kinds, background)
            scenes, edits = [base], []
            for edit_type in self.rng.sample(EDIT_TYPES, len(EDIT_TYPES)):
                edit = random_edit(self.rng, base, edit_type, self.kinds)
                if edit is None:
                    continue
                scene = edit.apply(base)
                if scene.key() in {s.key() for s in scenes}:
                    continue
                scenes.append(scene)
                edits.append(edit)
                if len(edits) == variants:
                    break
            keys = {s.key() for s in scenes}
            if len(edits) == variants and not keys & self.seen:
                self.seen |= keys
                return Group.of(base, edits, self.rng)


def split_counts(total: int, fractions: dict[str, float]) -> dict[str, int]:
    """Split ``total`` items over splits by fraction; every split gets at least one."""
    counts = {name: max(1, round(total * f)) for name, f in fractions.items()}
    first = next(iter(counts))
    counts[first] = max(1, total - sum(v for k, v in counts.items() if k != first))
    return counts


# -- writers in the real on-disk formats ---------------------------------------------------------------


CIRR_SPLITS = ("train", "val", "test1")
CIRR_PAIRS_PER_SET = 10  # every forward and inverse pair of a group


def write_cirr(out: Path, pairs: int, seed: int, image_size: int = 128) -> dict[str, int]:
    """CIRR layout of near-duplicate groups (``pairs`` over train/val/test1 as 80/10/10 %); see write_cirr_groups."""
    rng = random.Random(seed)
    factory = SceneFactory(rng)
    counts = split_counts(pairs, {"train": 0.8, "val": 0.1, "test1": 0.1})
    groups = {split: (factory.group() for _ in range(math.ceil(n / CIRR_PAIRS_PER_SET))) for split, n in counts.items()}
    return write_cirr_groups(out, groups, counts, CIRR_PAIRS_PER_SET, rng, image_size)


def write_cirr_groups(out: Path, groups: dict[str, Iterable[Group]], counts: dict[str, int], pairs_per_set: int,
                      rng: random.Random, image_size: int) -> dict[str, int]:
    """Write each split's groups in CIRR's layout: captions/cap.rc2.{train,val,test1}.json,
    image_splits/split.rc2.*.json, train/<n>/, dev/, test1/; one ``img_set`` per group, its first ``pairs_per_set``
    pairs as queries until the split has ``counts[split]`` (later groups' images are gallery only). test1 captions
    carry no target (as in CIRR); its hidden targets go to synthetic/test1_targets.json. synthetic/ also holds
    edit_types.<split>.json (pairid -> edit type) and scenes.<split>.json (image -> background, shapes)."""
    prefixes = {"train": "train", "val": "dev", "test1": "test1"}
    pairid, set_id, summary = 0, 0, {}
    for split in CIRR_SPLITS:
        wanted, prefix = counts[split], prefixes[split]
        captions, image_split, edit_types, hidden, scenes = [], {}, {}, {}, {}
        for group in groups[split]:
            names = [f"{prefix}-{set_id}-{i}-img{i % 2}" for i in range(len(group.scenes))]
            folder = f"train/{set_id % 100}" if split == "train" else prefix
            (out / folder).mkdir(parents=True, exist_ok=True)
            for name, scene in zip(names, group.scenes):
                render(scene, image_size).save(out / folder / f"{name}.png")
                image_split[name] = f"./{folder}/{name}.png"
                scenes[name] = {"background": scene.background, "shapes": [[s.kind, s.colour, s.size, s.cell] for s in scene.shapes]}
            members = rng.sample(names, len(names))
            for ref, tgt, edit in group.pairs[:pairs_per_set]:
                if len(captions) == wanted:
                    break
                record = {"pairid": pairid, "reference": names[ref], "caption": describe(edit, rng)}
                if split == "test1":
                    record["img_set"] = {"id": set_id, "members": members}
                    hidden[str(pairid)] = names[tgt]
                else:
                    record.update(
                        target_hard=names[tgt],
                        target_soft={names[tgt]: 1.0},
                        img_set={
                            "id": set_id,
                            "members": members,
                            "reference_rank": members.index(names[ref]),
                            "target_rank": members.index(names[tgt]),
                        },
                    )
                captions.append(record)
                edit_types[str(pairid)] = edit.type
                pairid += 1
            set_id += 1
        write_json(out / "captions" / f"cap.rc2.{split}.json", captions)
        write_json(out / "image_splits" / f"split.rc2.{split}.json", image_split)
        write_json(out / "synthetic" / f"edit_types.{split}.json", edit_types)
        write_json(out / "synthetic" / f"scenes.{split}.json", scenes)
        if hidden:
            write_json(out / "synthetic" / "test1_targets.json", hidden)
        summary[split] = len(captions)
    return summary


def write_fashioniq(out: Path, pairs: int, seed: int, image_size: int = 128) -> dict[str, int]:
    """FashionIQ layout: captions/cap.<category>.<split>.json with two captions per pair (one edit
    each: the target is two edits away from the candidate), image_splits/split.{cat}.{split}.json, images/. test
    captions name no target (as FashionIQ's); their hidden targets go to synthetic/fashioniq_test_targets.json
    ({category: [target per caption record]})."""
    rng = random.Random(seed)
    (out / "captions").mkdir(parents=True, exist_ok=True)
    (out / "image_splits").mkdir(parents=True, exist_ok=True)
    (out / "images").mkdir(parents=True, exist_ok=True)
    used_names: set[str] = set()
    seen: set = set()
    summary, hidden = {}, {}
    per_category = split_counts(pairs, dict.fromkeys(FASHIONIQ_CATEGORIES, 1 / 3))
    for category, (kinds, background) in FASHIONIQ_CATEGORIES.items():
        for split, wanted in split_counts(per_category[category], {"train": 0.8, "val": 0.1, "test": 0.1}).items():
            captions, names = [], []
            while len(captions) < wanted:
                base = random_scene(rng, kinds, background)
                steps = [random_edit(rng, base, t, kinds) for t in rng.sample(EDIT_TYPES, 1)]
                if steps[0] is None:
                    continue
                middle = steps[0].apply(base)
                second = random_edit(rng, middle, rng.choice(EDIT_TYPES), kinds)
                if second is None:
                    continue
                target = second.apply(middle)
                if {base.key(), target.key()} & seen or base.key() == target.key():
                    continue
                seen |= {base.key(), target.key()}
                pair_names = [_asin(rng, used_names), _asin(rng, used_names)]
                for name, scene in zip(pair_names, (base, target)):
                    render(scene, image_size).save(out / "images" / f"{name}.png")
                names += pair_names
                record = {"target": pair_names[1], "candidate": pair_names[0],
                          "captions": [describe(steps[0], rng), describe(second, rng)]}
                if split == "test":
                    hidden.setdefault(category, []).append(record.pop("target"))
                captions.append(record)
            write_json(out / "captions" / f"cap.{category}.{split}.json", captions)
            write_json(out / "image_splits" / f"split.{category}.{split}.json", names)
            summary[f"{category}.{split}"] = len(captions)
    if hidden:
        (out / "synthetic").mkdir(exist_ok=True)
        write_json(out / "synthetic" / "fashioniq_test_targets.json", hidden)
    return summary


def write_ipr2pr(out: Path, pairs: int, seed: int, image_size: int = 128, rows_per_shard: int = 500) -> dict[str, int]:
    """IPr2Pr layout: data/train-XXXXX-of-YYYYY.parquet with the Hugging Face columns and PNG bytes."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(seed)
    factory = SceneFactory(rng)
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    schema = pa.schema(
        [("original_prompt", pa.string()), ("original_image", image_type), ("edit_prompt", pa.string()),
         ("edited_prompt", pa.string()), ("edited_image", image_type)]
    )
    rows = _ipr2pr_rows(factory, rng, pairs, image_size)
    shards = math.ceil(pairs / rows_per_shard)
    (out / "data").mkdir(parents=True, exist_ok=True)
    for index in range(shards):
        batch = [next(rows) for _ in range(min(rows_per_shard, pairs - index * rows_per_shard))]
        table = pa.Table.from_pylist(batch, schema=schema)
        pq.write_table(table, out / "data" / f"train-{index:05d}-of-{shards:05d}.parquet")
    return {"train": pairs}


def _ipr2pr_rows(factory: SceneFactory, rng: random.Random, pairs: int, image_size: int) -> Iterator[dict]:
    made = 0
    while made < pairs:
        group = factory.group()
        for ref, tgt, edit in group.pairs:
            if made == pairs:
                return
            before, after = group.scenes[ref], group.scenes[tgt]
            yield {
                "original_prompt": caption_of(before),
                "original_image": {"bytes": png_bytes(render(before, image_size)), "path": None},
                "edit_prompt": describe(edit, rng),
                "edited_prompt": caption_of(after),
                "edited_image": {"bytes": png_bytes(render(after, image_size)), "path": None},
            }
            made += 1


def write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1))


def _asin(rng: random.Random, used: set[str]) -> str:
    """A fresh FashionIQ-style (Amazon ASIN-like) image name, e.g. B00A1B2C3D."""
    alphabet = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    while True:
        name = "B00" + "".join(rng.choice(alphabet) for _ in range(7))
        if name not in used:
            used.add(name)
            return name
