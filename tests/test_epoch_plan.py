"""The training input's plan of every epoch (no Ray): a fresh seeded shuffle per epoch (METHOD.md's data order),
reproducible from the seed, whole global batches, texts tokenised once, subset negatives from the row's own set."""

import numpy as np
import pyarrow as pa

from detailfusion.data.training_input import epoch_plan, sample_key
from detailfusion.model.tokenizer import build_tiny_tokenizer

ROWS = 22


def triplets() -> pa.Table:
    images = [f"img{i}" for i in range(ROWS + 6)]
    return pa.table({
        "sample_id": [f"q{i}" for i in range(ROWS)],
        "reference_id": images[:ROWS],
        "target_id": images[1:ROWS + 1],
        "text_variants": [[f"make it red {i}", f"turn it blue {i}"] for i in range(ROWS)],
        "subset_ids": [images[i:i + 6] for i in range(ROWS)],
    }), {image: i for i, image in enumerate(images)}


def plan(seed: int, epochs: int = 3, rows_per_epoch: int = 20, subset: int = 2):
    table, index = triplets()
    return epoch_plan(table, index, build_tiny_tokenizer(), 16, epochs, rows_per_epoch, seed, subset), table, index


def test_every_epoch_is_a_fresh_seeded_shuffle_of_distinct_rows():
    (columns, _), table, _ = plan(seed=0)
    keys = columns["sample_key"].reshape(3, 20)
    all_keys = {sample_key(s) for s in table.column("sample_id").to_pylist()}
    for epoch in keys:
        assert len(set(epoch.tolist())) == 20 and set(epoch.tolist()) <= all_keys  # cut to whole batches, no repeats
    assert not np.array_equal(keys[0], keys[1]) and not np.array_equal(keys[1], keys[2])
    (again, _), _, _ = plan(seed=0)
    (other, _), _, _ = plan(seed=1)
    assert all(np.array_equal(columns[k], again[k]) for k in columns)  # reproducible from the seed
    assert not np.array_equal(columns["sample_key"], other["sample_key"])


def test_rows_point_at_their_own_text_images_and_set_members():
    (columns, tokens), table, index = plan(seed=3)
    tokenizer = build_tiny_tokenizer()
    rows = {sample_key(r["sample_id"]): r for r in table.to_pylist()}
    texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in tokens["input_ids"]]
    assert tokens["input_ids"].shape == tokens["attention_mask"].shape == (2 * ROWS, 16)  # each text once
    for i, key in enumerate(columns["sample_key"]):
        row = rows[int(key)]
        assert texts[columns["text_row"][i]] in row["text_variants"]
        assert columns["reference_row"][i] == index[row["reference_id"]]
        assert columns["target_row"][i] == index[row["target_id"]]
        allowed = {index[m] for m in row["subset_ids"]} - {index[row["reference_id"]], index[row["target_id"]]}
        assert set(columns["subset_rows"][i].tolist()) <= allowed and len(set(columns["subset_rows"][i])) == 2
