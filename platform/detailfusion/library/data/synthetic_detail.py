"""The detail benchmark v2: local and global edits, every img_set member one edit from the reference.

A *scene* is shapes on a background (``synthetic_scenes.Shape``) plus a scene-wide *look*: background colour and
texture, light, palette, outline or fill, blur (appearance) and mirror, rotation, zoom and shift (geometry). An edit
is LOCAL (``synthetic_scenes.Edit``: recolour, reshape, add, remove, move or resize one shape) or GLOBAL
(``LookEdit``: one look attribute changes). Every query is tagged with its edit type, family, direction (forward: away
from the scene root; inverse: back to it) and scene root.

A root family: a root scene, a *pivot* shape and ``siblings`` bases (the root and copies with the pivot replaced by
another kind or colour in the same cell), and a pool of 4 local and 4 global edits that spare the pivot. The gallery
holds every base and every pool edit of every base. Queries:
- forward: base -> one pool edit of it; its img_set is the reference, the target, 3 other pool edits of the target's
  family (wrong edits of the reference) and 1 of the other family;
- inverse: a pool edit of a base -> the base (the edit undone); its img_set is the reference, the target and 4 fresh
  edits of the reference (3 of the target's family, 1 of the other).
So every member is one edit from the reference (no member is singled out by its distance), and the gallery holds the
right edit applied to the sibling bases (right for the text, wrong pivot). Each image is rendered with its own small
random displacement of every shape (seeded by its name), so pixel distance says little about which one edit was made.
Roots never repeat across splits. Deterministic by seed.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field, replace
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter, ImageOps

from detailfusion.library.data.synthetic_scenes import (
    CELLS,
    COLOURS,
    EDIT_TYPES,
    KINDS,
    SIZES,
    Edit,
    Shape,
    describe,
    write_json,
)
from detailfusion.library.errors import ConfigError, DataError

BACKGROUNDS = {"grey": (178, 178, 184), "sand": (212, 198, 166), "sky": (166, 198, 226), "mint": (170, 214, 186),
               "rose": (226, 184, 192), "lilac": (198, 184, 226)}
LOOK_VALUES = {  # attribute -> its values; the first is the root's (except background: any)
    "background": tuple(BACKGROUNDS),
    "texture": ("plain", "stripes", "dots"),
    "light": ("normal", "bright", "dark"),
    "palette": ("natural", "warm", "cool"),
    "style": ("filled", "outline"),
    "blur": ("sharp", "blurred"),
    "mirror": ("unmirrored", "mirrored"),
    "rotation": (0, 90, 180, 270),  # degrees counter-clockwise
    "zoom": ("normal", "zoomed"),
    "shift": ("centred", "left", "right", "up", "down"),
}
APPEARANCE = ("background", "texture", "light", "palette", "style", "blur")
GEOMETRY = ("mirror", "rotation", "zoom", "shift")
GLOBAL_TYPES = APPEARANCE + GEOMETRY
LOCAL_TYPES = EDIT_TYPES
JITTER = 0.08  # each shape's random displacement per image, as a fraction of the image side


@dataclass(frozen=True)
class Look:
    background: str = "grey"
    texture: str = "plain"
    light: str = "normal"
    palette: str = "natural"
    style: str = "filled"
    blur: str = "sharp"
    mirror: str = "unmirrored"
    rotation: int = 0
    zoom: str = "normal"
    shift: str = "centred"


@dataclass(frozen=True)
class DetailScene:
    shapes: tuple[Shape, ...]
    look: Look = field(default_factory=Look)

    def key(self) -> tuple:
        return (tuple(sorted((s.kind, s.colour, s.size, s.cell) for s in self.shapes)), self.look)

    def free_cells(self) -> list[int]:
        used = {s.cell for s in self.shapes}
        return [c for c in range(len(CELLS)) if c not in used]

    def has(self, kind: str, colour: str) -> bool:
        return any(s.kind == kind and s.colour == colour for s in self.shapes)


@dataclass(frozen=True)
class LookEdit:
    """A GLOBAL edit: one look attribute from ``before`` to ``after``."""

    attribute: str
    before: str | int
    after: str | int

    @property
    def type(self) -> str:
        return self.attribute

    def inverse(self) -> "LookEdit":
        return LookEdit(self.attribute, self.after, self.before)

    def apply(self, scene: DetailScene) -> DetailScene:
        return replace(scene, look=replace(scene.look, **{self.attribute: self.after}))


def family_of(edit: Edit | LookEdit) -> str:
    return "global" if isinstance(edit, LookEdit) else "local"


def apply(edit: Edit | LookEdit, scene: DetailScene) -> DetailScene:
    if isinstance(edit, LookEdit):
        return edit.apply(scene)
    shapes = [s for s in scene.shapes if s != edit.before] + ([edit.after] if edit.after is not None else [])
    return replace(scene, shapes=tuple(shapes))


def applies(edit: Edit | LookEdit, scene: DetailScene) -> bool:
    """Whether ``edit`` is one valid edit of ``scene``: its shape is there, its cell free, names stay unique."""
    if isinstance(edit, LookEdit):
        return getattr(scene.look, edit.attribute) == edit.before and edit.before != edit.after
    if edit.before is not None and edit.before not in scene.shapes:
        return False
    others = [s for s in scene.shapes if s != edit.before]
    if edit.after is not None:
        if any(s.cell == edit.after.cell for s in others) or any((s.kind, s.colour) == (edit.after.kind, edit.after.colour)
                                                                 for s in others):
            return False
    return len(others) + (edit.after is not None) >= 1


# -- scenes and edits ---------------------------------------------------------------------------------


def random_root(rng: random.Random, count: tuple[int, int] = (4, 5)) -> DetailScene:
    """4-5 shapes ((kind, colour) and cell each used once) on a random background, every other look at its root value."""
    shapes: list[Shape] = []
    for cell in rng.sample(range(len(CELLS)), rng.randint(*count)):
        while True:
            shape = Shape(rng.choice(KINDS), rng.choice(list(COLOURS)), rng.choice(list(SIZES)), cell)
            if not any((s.kind, s.colour) == (shape.kind, shape.colour) for s in shapes):
                shapes.append(shape)
                break
    return DetailScene(tuple(shapes), Look(background=rng.choice(list(BACKGROUNDS))))


LOOK_CHANGE = 0.3  # random_scene: chance that a look attribute (texture, light, ... shift) leaves its root value


def random_scene(rng: random.Random, count: tuple[int, int] = (1, 6)) -> DetailScene:
    """``count`` shapes on a random background, each other look attribute changed with probability ``LOOK_CHANGE``:
    every global look and their mixtures (the stand-in ViT's and stage 1's corpora), not only the roots' plain look."""
    scene = random_root(rng, count=count)
    for attribute in GLOBAL_TYPES:
        if attribute != "background" and rng.random() < LOOK_CHANGE:
            scene = random_look_edit(rng, scene, attribute).apply(scene)
    return scene


def random_local_edit(rng: random.Random, scene: DetailScene, edit_type: str, spare: Shape | None = None) -> Edit | None:
    """A valid LOCAL edit of ``edit_type`` that neither touches ``spare`` nor takes its cell, or None."""
    shapes = [s for s in scene.shapes if s != spare]
    free = [c for c in scene.free_cells()]
    if not shapes:
        return None
    shape = rng.choice(shapes)
    if edit_type == "recolour":
        options = [c for c in COLOURS if not scene.has(shape.kind, c)]
        edit = Edit(shape, replace(shape, colour=rng.choice(options))) if options else None
    elif edit_type == "reshape":
        options = [k for k in KINDS if not scene.has(k, shape.colour)]
        edit = Edit(shape, replace(shape, kind=rng.choice(options))) if options else None
    elif edit_type == "add":
        options = [(k, c) for k in KINDS for c in COLOURS if not scene.has(k, c)]
        if not free or not options:
            return None
        kind, colour = rng.choice(options)
        edit = Edit(None, Shape(kind, colour, rng.choice(list(SIZES)), rng.choice(free)))
    elif edit_type == "remove":
        edit = Edit(shape, None) if len(scene.shapes) > 2 else None
    elif edit_type == "move":
        edit = Edit(shape, replace(shape, cell=rng.choice(free))) if free else None
    elif edit_type == "resize":
        edit = Edit(shape, replace(shape, size="small" if shape.size == "large" else "large"))
    else:
        raise ValueError(f"unknown local edit type {edit_type!r}; known: {', '.join(LOCAL_TYPES)}")
    return edit if edit is not None and applies(edit, scene) else None


def random_look_edit(rng: random.Random, scene: DetailScene, attribute: str) -> LookEdit:
    """A GLOBAL edit of ``attribute`` to another of its values."""
    current = getattr(scene.look, attribute)
    return LookEdit(attribute, current, rng.choice([v for v in LOOK_VALUES[attribute] if v != current]))


def describe_change(edit: Edit | LookEdit, rng: random.Random) -> str:
    """One of several natural phrasings of ``edit`` (local: ``synthetic_scenes.describe``)."""
    if not isinstance(edit, LookEdit):
        return describe(edit, rng)
    options = _look_phrases(edit)
    text = rng.choice(options)
    if rng.random() < 0.4:
        text = text[0].upper() + text[1:]
    if rng.random() < 0.3:
        text += "."
    return text


def _look_phrases(edit: LookEdit) -> list[str]:
    a, b = edit.after, edit.before
    match edit.attribute:
        case "background":
            return [f"make the background {a}", f"change the background to {a}", f"put it on a {a} background",
                    f"the background should be {a}"]
        case "texture":
            if a == "plain":
                return ["make the background plain", "remove the pattern from the background", "no pattern in the background"]
            word = {"stripes": "striped", "dots": "dotted"}[a]
            return [f"make the background {word}", f"give the background {a}", f"add {a} to the background"]
        case "light":
            if a == "bright" or (a == "normal" and b == "dark"):
                return ["make the picture brighter", "brighten the image", "increase the brightness", "more light"]
            return ["make the picture darker", "darken the image", "lower the brightness", "less light"]
        case "palette":
            if a == "natural":
                return ["remove the colour tint", "restore the natural colours", "no tint"]
            return [f"give the image a {a} tint", f"make the colours {'warmer' if a == 'warm' else 'cooler'}",
                    f"apply a {a} colour filter"]
        case "style":
            if a == "outline":
                return ["draw the shapes as outlines only", "make the shapes hollow", "only the outlines of the shapes"]
            return ["fill the shapes in", "make the shapes solid", "draw the shapes filled"]
        case "blur":
            if a == "blurred":
                return ["blur the image", "make the picture blurry", "make it out of focus"]
            return ["sharpen the image", "make the picture sharp", "bring it into focus"]
        case "mirror":
            return ["mirror the image", "flip it horizontally", "flip the picture left to right"]
        case "rotation":
            turn = (a - b) % 360
            if turn == 180:
                return ["turn the picture upside down", "rotate it 180 degrees", "rotate the image half a turn"]
            side = "left" if turn == 90 else "right"
            wise = "counter-clockwise" if turn == 90 else "clockwise"
            return [f"rotate the image a quarter turn to the {side}", f"rotate it 90 degrees {wise}",
                    f"turn the picture {wise}"]
        case "zoom":
            if a == "zoomed":
                return ["zoom in", "zoom in on the centre", "crop closer to the middle"]
            return ["zoom out", "show the whole scene", "zoom back out"]
        case "shift":
            if a == "centred":
                return ["centre the whole scene", "move everything back to the middle", "put the scene back in the centre"]
            return [f"move everything to the {a}" if a in ("left", "right") else f"move everything {a}",
                    f"shift the whole scene {a}", f"slide the picture {a}"]
    raise ValueError(f"unknown look attribute {edit.attribute!r}; known: {', '.join(GLOBAL_TYPES)}")


def describe_scene(scene: DetailScene) -> str:
    """A plain caption of the whole scene, shapes then look (the stand-in ViT's pre-training text)."""
    parts = [f"a {s.size} {s.name} at the {CELLS[s.cell]}" for s in sorted(scene.shapes, key=lambda s: s.cell)]
    look = scene.look
    words = [f"on a {look.texture} {look.background} background" if look.texture != "plain"
             else f"on a {look.background} background"]
    words += [w for w in (look.light if look.light != "normal" else "", f"{look.palette} tint" if look.palette != "natural" else "",
                          "outlines" if look.style == "outline" else "", look.blur if look.blur != "sharp" else "",
                          look.mirror if look.mirror != "unmirrored" else "",
                          f"rotated {look.rotation} degrees" if look.rotation else "",
                          look.zoom if look.zoom != "normal" else "",
                          f"shifted {look.shift}" if look.shift != "centred" else "") if w]
    return ", ".join(parts) + " " + ", ".join(words)


# -- rendering -----------------------------------------------------------------------------------------


def render_detail(scene: DetailScene, size: int = 128, rng: random.Random | None = None) -> Image.Image:
    """The scene as an RGB image of ``size`` x ``size``: shapes (each displaced by up to JITTER of the side when
    ``rng`` is given) on the textured background, then palette, light, blur, mirror, rotation, zoom and shift."""
    look = scene.look
    background = BACKGROUNDS[look.background]
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    darker = tuple(int(c * 0.82) for c in background)
    if look.texture == "stripes":
        for x in range(-size, size, max(4, size // 10)):
            draw.line([(x, size), (x + size, 0)], fill=darker, width=max(1, size // 40))
    elif look.texture == "dots":
        step = max(4, size // 9)
        for y in range(step // 2, size, step):
            for x in range(step // 2, size, step):
                r = max(1, size // 64)
                draw.ellipse([x - r, y - r, x + r, y + r], fill=darker)
    for shape in scene.shapes:
        dx, dy = (rng.uniform(-JITTER, JITTER) * size, rng.uniform(-JITTER, JITTER) * size) if rng else (0.0, 0.0)
        _draw_shape(draw, shape, size, dx, dy, outline=look.style == "outline")
    if look.palette != "natural":
        r, g, b = image.split()
        warm = look.palette == "warm"
        image = Image.merge("RGB", (r.point(lambda v: min(255, int(v * (1.25 if warm else 0.8)))), g,
                                    b.point(lambda v: min(255, int(v * (0.8 if warm else 1.25))))))
    if look.light != "normal":
        gamma = 0.55 if look.light == "bright" else 1.8
        image = image.point(lambda v: int(255 * (v / 255) ** gamma))
    if look.blur == "blurred":
        image = image.filter(ImageFilter.GaussianBlur(radius=size / 40))
    if look.mirror == "mirrored":
        image = ImageOps.mirror(image)
    if look.rotation:
        image = image.transpose({90: Image.Transpose.ROTATE_90, 180: Image.Transpose.ROTATE_180,
                                 270: Image.Transpose.ROTATE_270}[look.rotation])
    if look.zoom == "zoomed":
        margin = round(size * 0.14)
        image = image.crop((margin, margin, size - margin, size - margin)).resize((size, size), Image.BICUBIC)
    if look.shift != "centred":
        step = size // 6
        dx, dy = {"left": (-step, 0), "right": (step, 0), "up": (0, -step), "down": (0, step)}[look.shift]
        canvas = Image.new("RGB", (size, size), image.getpixel((0, 0) if dx >= 0 and dy >= 0 else (size - 1, size - 1)))
        canvas.paste(image, (dx, dy))
        image = canvas
    return image


def _draw_shape(draw: ImageDraw.ImageDraw, shape: Shape, size: int, dx: float, dy: float, outline: bool) -> None:
    row, col = divmod(shape.cell, 3)
    cx, cy = (col + 0.5) * size / 3 + dx, (row + 0.5) * size / 3 + dy
    r = SIZES[shape.size] * size
    colour = COLOURS[shape.colour]
    paint = {"outline": colour, "width": max(2, size // 32)} if outline else {"fill": colour}
    if shape.kind == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], **paint)
    elif shape.kind == "square":
        draw.rectangle([cx - r * 0.85, cy - r * 0.85, cx + r * 0.85, cy + r * 0.85], **paint)
    elif shape.kind == "cross":
        w = r * 0.35
        points = [(cx - w, cy - r), (cx + w, cy - r), (cx + w, cy - w), (cx + r, cy - w), (cx + r, cy + w), (cx + w, cy + w),
                  (cx + w, cy + r), (cx - w, cy + r), (cx - w, cy + w), (cx - r, cy + w), (cx - r, cy - w), (cx - w, cy - w)]
        draw.polygon(points, **paint)
    else:
        if shape.kind == "triangle":
            points = [(cx, cy - r), (cx - r, cy + r * 0.8), (cx + r, cy + r * 0.8)]
        elif shape.kind == "diamond":
            points = [(cx, cy - r), (cx + r * 0.75, cy), (cx, cy + r), (cx - r * 0.75, cy)]
        else:  # star
            points = [(cx + (r if i % 2 == 0 else r * 0.45) * math.sin(i * math.pi / 5),
                       cy - (r if i % 2 == 0 else r * 0.45) * math.cos(i * math.pi / 5)) for i in range(10)]
        draw.polygon(points, **paint)


# -- root families and their queries -------------------------------------------------------------------


@dataclass(frozen=True)
class Query:
    reference: DetailScene
    target: DetailScene
    edit: Edit | LookEdit
    members: tuple[DetailScene, ...]  # the img_set: reference, target and 4 wrong edits of the reference
    direction: str  # "forward" | "inverse"


@dataclass(frozen=True)
class DetailV2Layout:
    """Query counts per split (roots = queries / queries_per_root) and the family shape of benchmark v2."""

    train_pairs: int = 10_000
    val_pairs: int = 1_000
    test_pairs: int = 4_000
    siblings: int = 5  # bases per root: the root and copies with another pivot (5: pixel R@5 <= 29 by family and direction)
    queries_per_root: int = 10  # 6 forward (3 local, 3 global) + 4 inverse (2 local, 2 global)
    held_out_types: tuple[str, ...] = ()  # edit types absent from train and val (no query, pool or img_set edit of
    #   theirs there); test1 keeps every type: what stage 1's corpus alone can teach (issue 33, the data-efficiency study)

    def __post_init__(self):
        for name in ("train_pairs", "val_pairs", "test_pairs"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 3 <= self.siblings <= 12:
            raise ConfigError(f"siblings must be in 3..12 (bases per scene root), got {self.siblings}")
        if self.queries_per_root != 10:
            raise ConfigError(f"queries_per_root is 10 in this layout (6 forward, 4 inverse), got {self.queries_per_root}")
        unknown = [t for t in self.held_out_types if t not in LOCAL_TYPES + GLOBAL_TYPES]
        if unknown:
            raise ConfigError(f"held_out_types: unknown edit type(s) {', '.join(map(repr, unknown))}; known: "
                              f"{', '.join(LOCAL_TYPES + GLOBAL_TYPES)}")
        if ("add" in self.held_out_types) != ("remove" in self.held_out_types):
            raise ConfigError("held_out_types: 'add' and 'remove' are each other's inverse (an inverse query undoes its "
                              "pool edit): hold out both or neither")
        if len([t for t in LOCAL_TYPES if t not in self.held_out_types]) < POOL or \
                len([t for t in GLOBAL_TYPES if t not in self.held_out_types]) < POOL:
            raise ConfigError(f"held_out_types {self.held_out_types}: each family needs {POOL} edit types left for a "
                              f"root's pool ({len(LOCAL_TYPES)} local, {len(GLOBAL_TYPES)} global in all)")

    @property
    def counts(self) -> dict[str, int]:
        return {"train": self.train_pairs, "val": self.val_pairs, "test1": self.test_pairs}


POOL = 4  # pool edits per family and root


class RootFactory:
    """Makes root families (``family``) whose scenes never repeat across the splits of one dataset."""

    def __init__(self, rng: random.Random, siblings: int):
        self.rng, self.siblings, self.seen = rng, siblings, set()
        self.local_types, self.global_types = LOCAL_TYPES, GLOBAL_TYPES

    def family(self, excluded_types: tuple[str, ...] = ()) -> tuple[list[DetailScene], list[Query]]:
        """(the family's gallery scenes, its 10 queries), no edit of ``excluded_types`` anywhere in it."""
        self.local_types = tuple(t for t in LOCAL_TYPES if t not in excluded_types)
        self.global_types = tuple(t for t in GLOBAL_TYPES if t not in excluded_types)
        while True:
            made = self._try()
            if made is not None:
                scenes, queries = made
                keys = {s.key() for s in scenes}
                if not keys & self.seen:
                    self.seen |= keys
                    return scenes, queries

    def _try(self):
        rng = self.rng
        root = random_root(rng)
        pivot = rng.choice(root.shapes)
        others = tuple(s for s in root.shapes if s != pivot)
        taken = {(s.kind, s.colour) for s in others}
        swaps = [Shape(k, c, pivot.size, pivot.cell) for k in KINDS for c in COLOURS if (k, c) not in taken and (k, c) != (pivot.kind, pivot.colour)]
        bases = [root] + [replace(root, shapes=others + (s,)) for s in rng.sample(swaps, self.siblings - 1)]
        local = self._local_pool(bases, pivot)
        if local is None:
            return None
        look = [random_look_edit(rng, root, a) for a in rng.sample(self.global_types, POOL)]
        pool = {"local": local, "global": look}
        scenes = list(bases) + [apply(e, b) for b in bases for e in local + look]
        if len({s.key() for s in scenes}) != len(scenes):
            return None
        queries = []
        for j, family in [(0, "local"), (0, "global"), (1, "local"), (1, "global"), (2, "local"), (2, "global")]:
            edit = rng.choice(pool[family])
            wrong = [e for e in pool[family] if e != edit][: POOL - 1] + [rng.choice(pool[_other(family)])]
            members = [bases[j], apply(edit, bases[j])] + [apply(e, bases[j]) for e in wrong]
            queries.append(Query(bases[j], apply(edit, bases[j]), edit, tuple(members), "forward"))
        inverse_bases = rng.sample(range(len(bases)), 4)
        for j, family in zip(inverse_bases, ["local", "local", "global", "global"]):
            done = apply(rng.choice(pool[family]), bases[j])
            undo = next(e for e in pool[family] if apply(e, bases[j]) == done).inverse()
            wrong = self._fresh_edits(done, undo, family)
            if wrong is None:
                return None
            members = [done, bases[j]] + [apply(e, done) for e in wrong]
            scenes += [apply(e, done) for e in wrong]
            queries.append(Query(done, bases[j], undo, tuple(members), "inverse"))
        if len({s.key() for s in scenes}) != len(scenes):
            return None
        return scenes, queries

    def _local_pool(self, bases: list[DetailScene], pivot: Shape) -> list[Edit] | None:
        """POOL local edits of distinct types that spare the pivot and apply to every base (names stay unique)."""
        pool = []
        for edit_type in self.rng.sample(self.local_types, len(self.local_types)):
            for _ in range(20):
                edit = random_local_edit(self.rng, bases[0], edit_type, spare=pivot)
                if edit is None or (edit.after is not None and edit.after.cell == pivot.cell):
                    continue
                if any(not applies(edit, b) for b in bases) or any(_clash(edit, e) for e in pool):
                    continue
                pool.append(edit)
                break
            if len(pool) == POOL:
                return pool
        return None

    def _fresh_edits(self, scene: DetailScene, undo: Edit | LookEdit, family: str) -> list | None:
        """3 wrong edits of ``scene`` in ``family`` (not ``undo``, distinct results) and 1 of the other family."""
        picked, results = [], {apply(undo, scene).key(), scene.key()}
        for want, count in ((family, POOL - 1), (_other(family), 1)):
            for _ in range(40):
                if want == "local":
                    edit = random_local_edit(self.rng, scene, self.rng.choice(self.local_types))
                else:
                    edit = random_look_edit(self.rng, scene, self.rng.choice(self.global_types))
                if edit is None or apply(edit, scene).key() in results:
                    continue
                picked.append(edit)
                results.add(apply(edit, scene).key())
                if sum(family_of(e) == want for e in picked) == count:
                    break
            else:
                return None
        return picked


def _other(family: str) -> str:
    return "global" if family == "local" else "local"


def _clash(a: Edit, b: Edit) -> bool:
    """Two pool edits that touch the same shape or cell (or name the same new shape) cannot both stand in one pool."""
    cells = lambda e: {s.cell for s in (e.before, e.after) if s is not None}  # noqa: E731
    names = lambda e: {(s.kind, s.colour) for s in (e.before, e.after) if s is not None}  # noqa: E731
    return bool(cells(a) & cells(b) or names(a) & names(b))


def write_detail_v2(out: Path, layout: DetailV2Layout, seed: int, image_size: int = 128,
                    workers: int | None = None) -> dict[str, int]:
    """Benchmark v2 in CIRR's layout: captions/cap.rc2.{train,val,test1}.json (each record also carries edit_type,
    edit_family, direction, scene_root; test1 without its target), image_splits/split.rc2.*.json, train/<n>/, dev/,
    test1/; synthetic/test1_targets.json (hidden targets), synthetic/scenes.<split>.json (image -> shapes and look)
    and synthetic/edits.<split>.json (pairid -> the structured edit). Returns queries per split. Images are drawn by
    ``workers`` processes (default: the machine's cores); each image's displacements are seeded by its name."""
    rng = random.Random(seed)
    factory = RootFactory(rng, layout.siblings)
    with Renderer(workers) as renderer:
        return _write_splits(out, layout, seed, image_size, rng, factory, renderer)


def _write_splits(out: Path, layout: DetailV2Layout, seed: int, image_size: int, rng: random.Random,
                  factory: RootFactory, renderer: "Renderer") -> dict[str, int]:
    prefixes = {"train": "train", "val": "dev", "test1": "test1"}
    pairid, root_id, set_ids, summary, jobs = 0, 0, {}, {}, []
    for split, wanted in layout.counts.items():
        prefix = prefixes[split]
        captions, image_split, hidden, scenes_out, edits_out = [], {}, {}, {}, {}
        while len(captions) < wanted:
            scenes, queries = factory.family(() if split == "test1" else layout.held_out_types)
            folder = f"train/{root_id % 100}" if split == "train" else prefix
            (out / folder).mkdir(parents=True, exist_ok=True)
            names = {}
            for k, scene in enumerate(scenes):
                name = f"{prefix}-{root_id}-{k}-img{k % 2}"
                names[scene.key()] = name
                jobs.append((str(out / folder / f"{name}.png"), scene, f"{seed}/{name}", image_size))
                image_split[name] = f"./{folder}/{name}.png"
                scenes_out[name] = _scene_record(scene)
            for query in queries[: wanted - len(captions)]:
                members = [names[s.key()] for s in query.members]
                rng.shuffle(members)
                set_id = set_ids.setdefault(frozenset(members), len(set_ids))
                ref, tgt = names[query.reference.key()], names[query.target.key()]
                record = {"pairid": pairid, "reference": ref, "caption": describe_change(query.edit, rng)}
                img_set = {"id": set_id, "members": members}
                if split == "test1":
                    hidden[str(pairid)] = tgt
                else:
                    record.update(target_hard=tgt, target_soft={tgt: 1.0})
                    img_set.update(reference_rank=members.index(ref), target_rank=members.index(tgt))
                record.update(img_set=img_set, edit_type=query.edit.type, edit_family=family_of(query.edit),
                              direction=query.direction, scene_root=root_id)
                captions.append(record)
                edits_out[str(pairid)] = _edit_record(query.edit)
                pairid += 1
            root_id += 1
        renderer.draw(jobs)
        jobs = []
        write_json(out / "captions" / f"cap.rc2.{split}.json", captions)
        write_json(out / "image_splits" / f"split.rc2.{split}.json", image_split)
        write_json(out / "synthetic" / f"scenes.{split}.json", scenes_out)
        write_json(out / "synthetic" / f"edits.{split}.json", edits_out)
        if hidden:
            write_json(out / "synthetic" / "test1_targets.json", hidden)
        summary[split] = len(captions)
    return summary


def _draw(job: tuple[str, DetailScene, str, int]) -> None:
    path, scene, seed, size = job
    render_detail(scene, size, random.Random(seed)).save(path, compress_level=1)


class Renderer:
    """Draws (path, scene, seed, size) jobs in a pool of processes (in this process when ``workers`` is 1)."""

    def __init__(self, workers: int | None = None):
        import os

        self.workers = workers or os.cpu_count() or 1
        self.pool = None

    def __enter__(self) -> "Renderer":
        if self.workers > 1:
            import multiprocessing

            self.pool = multiprocessing.get_context("fork").Pool(self.workers)
        return self

    def __exit__(self, *exc) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool.join()

    def draw(self, jobs: list) -> None:
        if self.pool is None:
            for job in jobs:
                _draw(job)
        else:
            for _ in self.pool.imap_unordered(_draw, jobs, chunksize=64):
                pass


def _scene_record(scene: DetailScene) -> dict:
    return {"shapes": [[s.kind, s.colour, s.size, s.cell] for s in scene.shapes], "look": vars(scene.look).copy()}


def scene_from_record(record: dict) -> DetailScene:
    return DetailScene(tuple(Shape(*s) for s in record["shapes"]), Look(**record["look"]))


def _edit_record(edit: Edit | LookEdit) -> dict:
    if isinstance(edit, LookEdit):
        return {"family": "global", "type": edit.type, "before": edit.before, "after": edit.after}
    shape = lambda s: None if s is None else [s.kind, s.colour, s.size, s.cell]  # noqa: E731
    return {"family": "local", "type": edit.type, "before": shape(edit.before), "after": shape(edit.after)}


def edit_from_record(record: dict) -> Edit | LookEdit:
    if record["family"] == "global":
        return LookEdit(record["type"], record["before"], record["after"])
    shape = lambda s: None if s is None else Shape(*s)  # noqa: E731
    return Edit(shape(record["before"]), shape(record["after"]))


def benchmark_scene_keys(root: str | Path, split: str = "test1") -> set[tuple]:
    """The scene keys of a written detail benchmark v2's split (``root/synthetic/scenes.<split>.json``)."""
    path = Path(root) / "synthetic" / f"scenes.{split}.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no scene records; is {root} a detail benchmark v2 (synth --kind detail)?")
    keys = set()
    for name, record in json.loads(path.read_text()).items():
        try:
            keys.add(scene_from_record(record).key())
        except (KeyError, TypeError) as exc:
            raise DataError(f"{path}: image {name!r} is not a v2 scene record ({exc!r}): {record!r}") from None
    return keys
