"""The index backends of ``detailfusion index`` and ``serve`` without Ray: ``index_store.write_index`` (the job's
writing step) and ``open_index`` on small synthetic galleries [N, Nq = 8, 2D = 2 x 16], and the typed
``index_backend`` section of ``EvalConfig``."""

import pyarrow.parquet as pq
import pytest
import torch
from torch.nn import functional as F

from detailfusion.library.config import ConfigError, EvalConfig, IndexBackendConfig, from_dict, load_config
from detailfusion.library.index.compressed import CompressedIndex, CompressedIndexConfig
from detailfusion.library.index.exact import EMBEDDINGS_FILE, IMAGES_FILE, GalleryIndex, IndexMismatch
from detailfusion.library.index.store import open_index, stored_backend, write_index
from detailfusion.library.model.fusion import fused_query

IMAGES, TOKENS, WIDTH = 120, 8, 16  # N, Nq, D per branch
# every IVF list, every token vector a hit, every candidate re-ranked, on float32 values: exact search
COVER_ALL = CompressedIndexConfig(nlist=8, m=4, nbits=4, nprobe=8, candidates=IMAGES * TOKENS, rerank=0,
                                  store_dtype="float32")
IVFPQ = IndexBackendConfig(kind="ivfpq", ivfpq=COVER_ALL)


pytestmark = pytest.mark.usefixtures("one_faiss_thread")  # conftest.py


def gallery(rule: str = "branch_max", fingerprint: str = "model-a") -> GalleryIndex:
    """Random unified tokens (each branch half L2-normalised, the whole / sqrt 2) with ids, locations, thumbnails."""
    tokens = torch.randn(IMAGES, TOKENS, 2 * WIDTH, generator=torch.Generator().manual_seed(0))
    embeddings = torch.cat([F.normalize(half, dim=-1) for half in tokens.split(WIDTH, dim=-1)], dim=-1) / 2 ** 0.5
    return GalleryIndex(embeddings, [f"img{n}" for n in range(IMAGES)], fingerprint,
                        locations=[f"/images/{n}.jpg" for n in range(IMAGES)],
                        thumbnails=[b"\xff\xd8jpeg%d" % n for n in range(IMAGES)], fusion_score=rule,
                        source={"config_hash": "abc"})


def queries(count: int, rule: str) -> torch.Tensor:
    """Unified queries [Q, 2D] by the fusion rule, branch weights in [0, 1] (the first two: one branch only)."""
    generator = torch.Generator().manual_seed(1)
    q_gm, q_di = (F.normalize(torch.randn(count, WIDTH, generator=generator), dim=-1) for _ in range(2))
    a = torch.rand(count, 1, generator=generator)
    a[:2, 0] = torch.tensor([0.0, 1.0])
    return fused_query(q_gm, q_di, torch.cat([a, 1 - a], dim=1), rule)


def test_open_index_opens_each_backend_and_refuses_another_model(tmp_path):
    exact = gallery()
    write_index(exact, tmp_path / "exact")  # the default: exact
    write_index(exact, tmp_path / "ivfpq", IVFPQ)
    assert stored_backend(tmp_path / "exact") == "exact" and stored_backend(tmp_path / "ivfpq") == "ivfpq"
    assert stored_backend(tmp_path / "absent") is None
    for name, kind in (("exact", GalleryIndex), ("ivfpq", CompressedIndex)):
        opened = open_index(tmp_path / name, model_fingerprint="model-a")
        assert type(opened) is kind
        assert opened.image_ids == exact.image_ids and len(opened) == IMAGES
        assert opened.fusion_score == "branch_max" and opened.model_fingerprint == "model-a"
        opened.check_model("model-a")
        with pytest.raises(IndexMismatch, match="built by model model-a.*model in use is model-b"):
            opened.check_model("model-b")
        with pytest.raises(IndexMismatch, match=f"index {tmp_path / name} was built by model model-a"):
            open_index(tmp_path / name, model_fingerprint="model-b")
        # the serving front end reads ids and thumbnails from images.parquet, the same for both backends
        table = pq.read_table(tmp_path / name / IMAGES_FILE)
        assert table.column("image_id").to_pylist() == exact.image_ids
        assert table.column("thumbnail").to_pylist() == exact.thumbnails
        assert table.column("location").to_pylist() == exact.locations
    with pytest.raises(ValueError, match="a 'ivfpq' index, not an exact one"):
        GalleryIndex.load(tmp_path / "ivfpq")
    with pytest.raises(FileNotFoundError, match="not a complete gallery index"):
        open_index(tmp_path / "absent")


@pytest.mark.parametrize("rule", ["branch_max", "joint_max"])
def test_the_compressed_index_covering_every_token_is_exact(rule, tmp_path):
    """Written as the ``index`` job writes it, searched as serving searches it: GalleryIndex's top-k and scores."""
    exact = gallery(rule)
    opened = open_index(write_index(exact, tmp_path, IVFPQ).directory, "model-a")
    assert isinstance(opened, CompressedIndex)
    unified = queries(30, rule)
    exact_scores, exact_top = exact.search(unified, 10)
    scores, top = opened.search(unified, 10)
    assert torch.equal(top, exact_top)
    assert torch.allclose(scores, exact_scores, atol=1e-5)


def test_writing_one_backend_removes_the_other(tmp_path):
    exact = gallery()
    write_index(exact, tmp_path)
    write_index(exact, tmp_path, IVFPQ)
    assert not (tmp_path / EMBEDDINGS_FILE).exists() and (tmp_path / "store.npy").is_file()
    write_index(exact, tmp_path)
    assert not any((tmp_path / name).exists() for name in ("store.npy", "gm.faiss", "di.faiss", "tokens.faiss"))
    assert isinstance(open_index(tmp_path), GalleryIndex)


def test_index_backend_from_overrides_and_files(tmp_path):
    config = load_config(EvalConfig, None, ["index_backend.kind=ivfpq", "index_backend.ivfpq.nprobe=32",
                                            "index_backend.ivfpq.store_dtype=float32"])
    assert config.index_backend == IndexBackendConfig("ivfpq", CompressedIndexConfig(nprobe=32, store_dtype="float32"))
    assert load_config(EvalConfig).index_backend == IndexBackendConfig()  # exact by default
    path = tmp_path / "eval.yaml"
    path.write_text("index_backend:\n  kind: ivfpq\n  ivfpq: {nlist: 256, candidates: 2048}\n")
    config = load_config(EvalConfig, path, ["index_backend.ivfpq.nlist=null"])
    assert config.index_backend.ivfpq == CompressedIndexConfig(nlist=None, candidates=2048)
    assert from_dict(EvalConfig, {"index_backend": {"ivfpq": {"m": 16}}}).index_backend.ivfpq.m == 16


def test_the_index_command_takes_the_backend():
    from detailfusion.platform import cli

    args = cli.build_parser().parse_args(["index", "--checkpoint", "model", "--out", "index",
                                          "--set", "index_backend.kind=ivfpq", "--set", "index_backend.ivfpq.rerank=0"])
    config = cli.command_config(args)  # nothing started
    assert config.index_backend.kind == "ivfpq" and config.index_backend.ivfpq.rerank == 0


def test_bad_backend_settings_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"--set index_backend.kind=hnsw: key 'index_backend.kind' expects one of "
                                          r"'exact', 'ivfpq', got 'hnsw'"):
        load_config(EvalConfig, None, ["index_backend.kind=hnsw"])
    with pytest.raises(ConfigError, match="unknown key 'index_backend.ivfpq.nprob'"):
        load_config(EvalConfig, None, ["index_backend.ivfpq.nprob=4"])
    with pytest.raises(ConfigError, match="key 'index_backend.ivfpq.nprobe' expects an integer"):
        load_config(EvalConfig, None, ["index_backend.ivfpq.nprobe=many"])
    with pytest.raises(ConfigError, match="nprobe=0 must be at least 1"):
        load_config(EvalConfig, None, ["index_backend.ivfpq.nprobe=0"])
    with pytest.raises(ConfigError, match="index_backend.kind='hnsw'"):
        write_index(gallery(), tmp_path, IndexBackendConfig(kind="hnsw"))


def test_evaluate_refuses_a_compressed_index(tmp_path):
    """Evaluation ranks with the exact index (the reference): a compressed one given as --index is refused, not
    overwritten, before anything starts."""
    from detailfusion.platform.eval.evaluate import evaluate

    write_index(gallery(), tmp_path / "index", IVFPQ)
    with pytest.raises(ConfigError, match="holds an index of backend 'ivfpq'; evaluate ranks with the exact index"):
        evaluate(EvalConfig(checkpoint=str(tmp_path / "model"), out=str(tmp_path / "out"),
                            index=str(tmp_path / "index")))
    assert stored_backend(tmp_path / "index") == "ivfpq" and not (tmp_path / "out").exists()


def test_evaluate_refuses_an_index_backend_it_would_not_use(tmp_path):
    """``index_backend`` is the index command's: evaluate refuses a non-default one rather than ignore it."""
    from detailfusion.platform.eval.evaluate import evaluate

    with pytest.raises(ConfigError, match="evaluate ranks with the exact index.*index_backend is the `detailfusion "
                                          "index` command's"):
        evaluate(EvalConfig(checkpoint=str(tmp_path / "model"), out=str(tmp_path / "out"), index_backend=IVFPQ))
    assert not (tmp_path / "out").exists()


def test_search_settings_apply_when_the_index_is_opened(tmp_path):
    """A compressed index opened with ``SearchSettings`` searches with them (each unset one keeps the built value),
    its files untouched; the exact index and bad values are refused."""
    from detailfusion.library.config import SearchSettings

    starved = IndexBackendConfig(kind="ivfpq", ivfpq=CompressedIndexConfig(nlist=8, m=4, nbits=4, nprobe=1,
                                                                            candidates=1, rerank=1))
    write_index(gallery(), tmp_path / "ivfpq", starved)
    files = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "ivfpq").iterdir()}
    opened = open_index(tmp_path / "ivfpq", search=SearchSettings(nprobe=8, rerank=0))
    assert (opened.config.nprobe, opened.config.candidates, opened.config.rerank) == (8, 1, 0)
    everything = open_index(tmp_path / "ivfpq", search=SearchSettings(nprobe=8, candidates=IMAGES * TOKENS, rerank=0))
    exact = gallery().search(queries(20, "branch_max"), 10)[1]
    assert torch.equal(everything.search(queries(20, "branch_max"), 10)[1], exact)
    assert not torch.equal(open_index(tmp_path / "ivfpq").search(queries(20, "branch_max"), 10)[1], exact)
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "ivfpq").iterdir()} == files
    write_index(gallery(), tmp_path / "exact")
    with pytest.raises(ConfigError, match="apply to a compressed"):
        open_index(tmp_path / "exact", search=SearchSettings(candidates=64))
    with pytest.raises(ConfigError, match="search.nprobe=0 must be at least 1"):
        SearchSettings(nprobe=0)
    assert load_config(EvalConfig, None, []).index_backend == IndexBackendConfig()


# -- shards ---------------------------------------------------------------------------------------------------


def test_merge_top_k_keeps_the_best_and_breaks_ties_by_gallery_row():
    from detailfusion.library.index.sharded import merge_top_k

    shard_a = (torch.tensor([[0.9, 0.5, 0.5]]), torch.tensor([[7, 2, 9]]))
    shard_b = (torch.tensor([[0.5, 0.1]]), torch.tensor([[1, 4]]))
    scores, rows = merge_top_k([shard_a, shard_b], 4)
    assert rows.tolist() == [[7, 1, 2, 9]] and scores[0].tolist() == pytest.approx([0.9, 0.5, 0.5, 0.5])
    with pytest.raises(ValueError, match="fewer than k=6"):
        merge_top_k([shard_a, shard_b], 6)


def test_shard_bounds_cover_the_gallery_without_gaps():
    from detailfusion.library.index.sharded import shard_bounds

    assert shard_bounds(10, 3) == [(0, 3), (3, 7), (7, 10)] and shard_bounds(5, 5)[-1] == (4, 5)
    with pytest.raises(ValueError, match="between 1 and 5"):
        shard_bounds(5, 6)


@pytest.mark.parametrize("kind", ["exact", "ivfpq"])
@pytest.mark.parametrize("rule", ["branch_max", "joint_max"])
def test_sharded_search_equals_one_index(tmp_path, kind, rule):
    """Fan-out over 3 shards and merge = one exact index over the whole gallery (ids, scores, tie order), with
    duplicate images across shard borders so that ties between shards occur; the shards reopen from disk."""
    from detailfusion.library.index.sharded import ShardedIndex

    whole = gallery(rule)
    whole.embeddings[45] = whole.embeddings[30]  # images 30 (shard 0) and 45 (shard 1) tie for every query
    backend = IndexBackendConfig(kind=kind, ivfpq=COVER_ALL, shards=3)
    written = write_index(whole, tmp_path / "index", backend)
    opened = open_index(tmp_path / "index", model_fingerprint="model-a")
    assert isinstance(opened, ShardedIndex) and len(opened.shards) == 3 and opened.image_ids == whole.image_ids
    assert pq.read_table(tmp_path / "index" / IMAGES_FILE).column("image_id").to_pylist() == whole.image_ids
    q = torch.cat([queries(20, rule), fused_query(whole.embeddings[30, :1, :WIDTH] * 2 ** 0.5,
                                                   whole.embeddings[30, :1, WIDTH:] * 2 ** 0.5,
                                                   torch.tensor([[0.5, 0.5]]), rule)])
    want_scores, want_rows = whole.search(q, 10)
    assert want_rows[-1, :2].tolist() == [30, 45]  # the planted tie is at the top of the last query
    for index in (written, opened):
        scores, rows = index.search(q, 10)
        assert torch.equal(rows, want_rows)
        torch.testing.assert_close(scores, want_scores, rtol=0, atol=1e-5)
    with pytest.raises(IndexMismatch):
        open_index(tmp_path / "index", model_fingerprint="model-b")


def test_rewriting_unsharded_removes_the_shards(tmp_path):
    write_index(gallery(), tmp_path / "index", IndexBackendConfig(shards=2))
    write_index(gallery(), tmp_path / "index")
    assert not list((tmp_path / "index").glob("shard-*")) and isinstance(open_index(tmp_path / "index"), GalleryIndex)
    with pytest.raises(ConfigError, match="shards must be >= 1"):
        IndexBackendConfig(shards=0)


def test_thumbnails_are_read_a_row_group_at_a_time(tmp_path):
    """Serving's thumbnails: images.parquet in row groups of THUMBNAIL_ROWS, one group read per thumbnail asked for,
    at most ``cached_groups`` kept; every image's own bytes, None where it has none or is unknown."""
    from detailfusion.library.index.exact import THUMBNAIL_ROWS, Thumbnails, write_images

    ids = [f"img{n}" for n in range(1000)]
    jpegs = [n.to_bytes(2, "big") * 8 if n % 7 else None for n in range(1000)]
    write_images(tmp_path / "images.parquet", ids, None, jpegs)
    thumbnails = Thumbnails(tmp_path / "images.parquet", cached_groups=2)
    assert thumbnails.file.num_row_groups == -(-1000 // THUMBNAIL_ROWS) > 1
    assert thumbnails.image_ids == ids
    for n in (1, 255, 256, 999, 300, 500, 8):
        assert thumbnails.get(ids[n]) == jpegs[n]
    assert thumbnails.get(ids[7]) is None and thumbnails.get("unknown") is None
    assert thumbnails.group.cache_info().currsize <= 2
