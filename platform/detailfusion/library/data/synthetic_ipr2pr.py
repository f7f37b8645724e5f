"""A synthetic IPr2Pr corpus in benchmark v2's world: stage 1's pre-training pairs (kind ``ipr2pr-detail``).

Each row is a drawn scene (1-6 shapes, a random look), one edit of it and its phrasing, as InstructPix2Pix's
``instructpix2pix-clip-filtered`` stores them (original/edited image as PNG bytes, original/edit/edited prompt),
plus two columns of ours, ``edit_type`` and ``edit_family``, that the reader ignores. The edit is LOCAL or GLOBAL
with equal odds, its type uniform within the family, so every one of benchmark v2's 16 edit types is taught, those
held out of the benchmark's train split (``DetailV2Layout.held_out_types``) included: the role IPr2Pr plays for
CIRR in the paper, a larger corpus with edits the CIR training split lacks. The corpus draws from its own seed stream
(a string seed, so no benchmark's ``Random(int)`` replays it) and refuses every pair with a scene of ``exclude``
(a benchmark's test1 scene keys), so no test scene is ever a training image.
"""

from __future__ import annotations

import io
import math
import random
from collections import Counter
from collections.abc import Hashable, Iterable, Iterator
from pathlib import Path

from detailfusion.library.data.synthetic_detail import (
    GLOBAL_TYPES,
    LOCAL_TYPES,
    DetailScene,
    apply,
    describe_change,
    describe_scene,
    family_of,
    random_local_edit,
    random_look_edit,
    random_scene,
    render_detail,
)

NAMESPACE = "ipr2pr-detail"
ROWS_PER_SHARD = 5000


def edit_pairs(seed: int, exclude: Iterable[Hashable] = ()) -> Iterator[tuple[DetailScene, object, DetailScene]]:
    """Endless (before, edit, after) of stream ``seed``: the family at even odds, the type uniform within it; a pair
    with a scene in ``exclude`` is refused."""
    rng, excluded = random.Random(f"{NAMESPACE}/{seed}"), frozenset(exclude)
    while True:
        before = random_scene(rng)
        if rng.random() < 0.5:
            edit = random_local_edit(rng, before, rng.choice(LOCAL_TYPES))
        else:
            edit = random_look_edit(rng, before, rng.choice(GLOBAL_TYPES))
        if edit is None:
            continue
        after = apply(edit, before)
        if before.key() in excluded or after.key() in excluded or before.key() == after.key():
            continue
        yield before, edit, after


def _png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _render_pair(job: tuple[DetailScene, DetailScene, str, int]) -> tuple[bytes, bytes]:
    before, after, name, size = job
    return (_png(render_detail(before, size, random.Random(f"{name}/original"))),
            _png(render_detail(after, size, random.Random(f"{name}/edited"))))


def write_ipr2pr_detail(out: Path, pairs: int, seed: int, image_size: int = 64, exclude: Iterable[Hashable] = (),
                        workers: int | None = None) -> dict:
    """``out/data/train-XXXXX-of-YYYYY.parquet`` (IPr2Pr's columns + edit_type, edit_family) of ``pairs`` rows;
    returns {"train": pairs, "edit_types": {type: rows}}. Images are drawn by ``workers`` processes (default: the
    machine's cores), each jittered by a seed of its row."""
    import multiprocessing
    import os

    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(f"{NAMESPACE}/{seed}/text")
    drawn = edit_pairs(seed, exclude)
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    schema = pa.schema([("original_prompt", pa.string()), ("original_image", image_type), ("edit_prompt", pa.string()),
                        ("edited_prompt", pa.string()), ("edited_image", image_type), ("edit_type", pa.string()),
                        ("edit_family", pa.string())])
    shards, types = math.ceil(pairs / ROWS_PER_SHARD), Counter()
    (out / "data").mkdir(parents=True, exist_ok=True)
    workers = workers or os.cpu_count() or 1
    pool = multiprocessing.get_context("fork").Pool(workers) if workers > 1 else None
    try:
        for index in range(shards):
            rows = [next(drawn) for _ in range(min(ROWS_PER_SHARD, pairs - index * ROWS_PER_SHARD))]
            jobs = [(b, a, f"{seed}/{index}/{i}", image_size) for i, (b, _, a) in enumerate(rows)]
            images = pool.map(_render_pair, jobs, chunksize=64) if pool else [_render_pair(j) for j in jobs]
            batch = []
            for (before, edit, after), (png_before, png_after) in zip(rows, images):
                types[edit.type] += 1
                batch.append({"original_prompt": describe_scene(before),
                              "original_image": {"bytes": png_before, "path": None},
                              "edit_prompt": describe_change(edit, rng), "edited_prompt": describe_scene(after),
                              "edited_image": {"bytes": png_after, "path": None},
                              "edit_type": edit.type, "edit_family": family_of(edit)})
            pq.write_table(pa.Table.from_pylist(batch, schema=schema),
                           out / "data" / f"train-{index:05d}-of-{shards:05d}.parquet")
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    return {"train": pairs, "edit_types": dict(sorted(types.items()))}
