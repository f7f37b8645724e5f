"""The index job's streamed compressed build (``eval/index_build.py``) on the session's Ray: the gallery encoded by a
2-actor Ray Data pool, streamed to one builder actor per shard, never whole in the driver; with settings that
re-rank every image it answers exactly as the exact index of the same model and split."""

from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from detailfusion.library.config import CompressedIndexConfig, EvalConfig, IndexBackendConfig, PrepareConfig
from detailfusion.library.data.synthetic import write_synthetic
from detailfusion.library.errors import ConfigError
from detailfusion.library.index.store import open_index
from detailfusion.library.model import build_model, save_model
from detailfusion.platform.data.prepare import prepare
from detailfusion.platform.eval.evaluate import build_index

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_local", "one_faiss_thread")]


@pytest.fixture(scope="module")
def split(tmp_path_factory) -> dict:
    """An untrained tiny model and a prepared synthetic CIRR split (its gallery: the images to index)."""
    root = tmp_path_factory.mktemp("index_build")
    torch.manual_seed(0)
    save_model(*build_model("tiny"), root / "model")
    write_synthetic("cirr", root / "raw", pairs=60, seed=3, image_size=64)
    prepare(PrepareConfig(dataset="cirr", root=str(root / "raw"), split="train", out=str(root / "prep"),
                          num_cpus=2))
    return {"root": root, "model": str(root / "model"), "prepared": str(root / "prep")}


def test_the_streamed_sharded_build_answers_as_the_exact_index(split, tmp_path):
    common = dict(dataset="cirr", split="train", checkpoint=split["model"], prepared=split["prepared"])
    exact = build_index(EvalConfig(**common, out=str(tmp_path / "exact")))
    every = CompressedIndexConfig(nlist=4, nbits=4, nprobe=4, candidates=10**6, rerank=0, store_dtype="float32",
                                  train_sample=512)
    backend = IndexBackendConfig(kind="ivfpq", ivfpq=every, shards=2, build_cpus=0.25)
    built = build_index(EvalConfig(**common, out=str(tmp_path / "ivfpq"), index_backend=backend, encoder_actors=2,
                                   cpus_per_actor=0.25, batch_size=8))
    opened = open_index(tmp_path / "ivfpq", exact.model_fingerprint)
    assert [len(s) for s in opened.shards] == [len(exact) // 2, len(exact) - len(exact) // 2]
    assert opened.image_ids == built.image_ids == exact.image_ids
    queries = torch.nn.functional.normalize(torch.randn(12, exact.embeddings.shape[2], generator=torch.Generator()
                                                        .manual_seed(1)), dim=1)
    want_scores, want = exact.search(queries, 10)
    got_scores, got = opened.search(queries, 10)
    assert torch.equal(got, want)
    torch.testing.assert_close(got_scores, want_scores)
    # the search page's thumbnails: the whole gallery's, in gallery order, as the exact index has them
    whole = pq.read_table(tmp_path / "ivfpq" / "images.parquet")
    assert whole.column("image_id").to_pylist() == exact.image_ids
    assert whole.column("thumbnail").to_pylist() == exact.thumbnails
    assert sum(opened.shards[0].meta["source"]["encoded_on"].values()) == len(exact)  # every image encoded once


def test_builders_the_cluster_cannot_hold_are_refused_before_encoding(split, tmp_path):
    backend = IndexBackendConfig(kind="ivfpq", shards=8, build_cpus=1.0)
    config = EvalConfig(dataset="cirr", split="train", checkpoint=split["model"], prepared=split["prepared"],
                        out=str(tmp_path / "index"), index_backend=backend)
    with pytest.raises(ConfigError, match="build_cpus"):
        build_index(config)
    assert not Path(tmp_path / "index" / "index.json").exists()
