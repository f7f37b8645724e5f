"""The Ray Serve endpoint over real HTTP on 127.0.0.1: a tiny model trained on synthetic CIRR (Ray Train) and its
gallery index; a query the model learned comes back first; every bad input is a documented 4xx and the server
keeps serving; the search page works in headless Chromium (screenshot kept), and so does /docs with the network off;
a second app with an API token and room for 2 searches refuses requests without the token and sheds a burst (503);
echoed input comes back cut short."""

import base64
import io
import json
import os
import shutil
import socket
import struct
import subprocess
import zlib
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import requests
import torch
from conftest import missing_prerequisite
from PIL import Image

from detailfusion.library.config import ConfigError, EvalConfig, JobConfig, PrepareConfig, ServeConfig, load_config
from detailfusion.library.data.synthetic import write_synthetic
from detailfusion.library.index.exact import GalleryIndex
from detailfusion.library.model import build_model, load_model, save_model
from detailfusion.library.model.inference import embed_queries
from detailfusion.platform.data.prepare import prepare
from detailfusion.platform.eval.evaluate import build_index
from detailfusion.platform.train.run import run_stage

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_local")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, ray_local):
    """Stage 2 of the tiny model on 96 synthetic CIRR triplets (Ray Train), its index, and a query it learned."""
    root = tmp_path_factory.mktemp("serve")
    torch.manual_seed(0)
    save_model(*build_model("tiny"), root / "init")
    write_synthetic("cirr", root / "raw", pairs=120, seed=7, image_size=64)
    prepare(PrepareConfig(dataset="cirr", root=str(root / "raw"), split="train", out=str(root / "prep"),
                          cache_vision_features=True, model=str(root / "init")))
    config = load_config(JobConfig, REPO / "jobs/configs/stage2_tiny.yaml", [
        f"workdir={root}", f"data.prepared={root / 'prep'}", f"model.init_from={root / 'init'}", "train.epochs=20",
        "train.batch_size=16", "train.log_every=1000"])
    model_dir = run_stage(config)
    build_index(EvalConfig(dataset="cirr", split="train", checkpoint=str(model_dir), prepared=str(root / "prep"),
                           out=str(root / "index"), cpus_per_actor=0.5))
    # a training query whose top-1 over the whole gallery (nothing removed, as the server ranks) is its target
    model, tokenizer = load_model(model_dir)
    index = GalleryIndex.load(root / "index")
    triplets = pq.read_table(root / "prep" / "triplets").to_pylist()
    source = json.loads((root / "raw/image_splits/split.rc2.train.json").read_text())
    from detailfusion.platform.data.training_input import PIXELS, load_image_store

    position, images = load_image_store(root / "prep", PIXELS)
    pixels = torch.from_numpy(images[[position[t["reference_id"]] for t in triplets]])
    features = embed_queries(model.eval(), tokenizer, pixels, [t["text"] for t in triplets])
    _, top = index.search(features["unified"], 1)
    learned = [t for t, row in zip(triplets, top[:, 0].tolist()) if index.image_ids[row] == t["target_id"]]
    # a random ranking gets len(triplets) / len(index) (here 1.6) right at rank 1; 3x that has p ~ 0.02 by chance
    chance = len(triplets) / len(index)
    assert len(learned) >= 3 * chance, f"the model learned too little: {len(learned)} of {len(triplets)} right at rank 1"
    print(f"trained model: {len(learned)} of {len(triplets)} training queries right at rank 1 (chance {chance:.1f})")
    query = learned[0]
    return {"model": model_dir, "index": root / "index", "query": query,
            "reference_png": (root / "raw" / source[query["reference_id"]]).read_bytes(), "gallery": len(index)}


@pytest.fixture(scope="module")
def server(trained):
    from ray import serve

    from detailfusion.platform.serving.run import start

    config = ServeConfig(checkpoint=str(trained["model"]), index=str(trained["index"]), port=free_port(),
                         replica_cpus=0.5, frontend_cpus=0.1, max_replicas=1, max_body_mb=1.0, max_top_k=50)
    start(config)
    yield f"http://127.0.0.1:{config.port}"
    serve.shutdown()


def search_multipart(url, image: bytes, text, top_k=5, **fields):
    return requests.post(f"{url}/search", files={"image": ("ref.png", image, "image/png")},
                         data={"text": text, "top_k": str(top_k), **fields}, timeout=60)


def png_header_only(width: int, height: int) -> bytes:
    """A small PNG whose header claims ``width x height`` pixels (a decompression bomb's signature)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + chunk(b"IEND", b""))


def test_a_learned_query_comes_back_first(server, trained):
    query = trained["query"]
    response = search_multipart(server, trained["reference_png"], query["text"], top_k=5)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert [hit["image_id"] for hit in answer["results"]][0] == query["target_id"]
    assert len(answer["results"]) == 5 and answer["results"][0]["score"] >= answer["results"][-1]["score"]
    assert answer["weights"]["gm"] + answer["weights"]["di"] == pytest.approx(1.0, abs=1e-5)
    # the same query as base64 JSON, and a gallery image as the reference
    as_json = requests.post(f"{server}/search", json={"image": base64.b64encode(trained["reference_png"]).decode(),
                                                      "text": query["text"], "top_k": 3}, timeout=60)
    assert as_json.status_code == 200 and as_json.json()["results"][0]["image_id"] == query["target_id"]
    by_id = requests.post(f"{server}/search", json={"reference_id": query["reference_id"], "text": query["text"]},
                          timeout=60)
    assert by_id.status_code == 200
    by_id_results = [r["image_id"] for r in by_id.json()["results"]]
    # the gallery copy of the reference (its thumbnail's pixels) answers as an upload of those pixels does, less the
    # reference itself (CIRR's protocol)
    thumbnail = requests.get(f"{server}/thumbnails/{query['reference_id']}", timeout=60).content
    upload = requests.post(f"{server}/search", files={"image": ("t.jpg", thumbnail, "image/jpeg")},
                           data={"text": query["text"], "top_k": "11"}, timeout=60).json()["results"]
    expected = [r["image_id"] for r in upload if r["image_id"] != query["reference_id"]][:10]
    assert len(by_id_results) == 10 and query["reference_id"] not in by_id_results
    assert by_id_results == expected


def truncated_png(data: bytes) -> bytes:
    return data[: len(data) // 2]


BAD = {  # name: (request kwargs builder, status, error code)
    "not_an_image": (lambda t: dict(files={"image": ("x.png", b"hello, not an image", "image/png")},
                                    data={"text": "make it red"}), 400, "bad_image"),
    "truncated_image": (lambda t: dict(files={"image": ("x.png", truncated_png(t["reference_png"]), "image/png")},
                                       data={"text": "make it red"}), 400, "bad_image"),
    "decompression_bomb": (lambda t: dict(files={"image": ("x.png", png_header_only(100_000, 100_000), "image/png")},
                                          data={"text": "make it red"}), 413, "image_too_large"),
    "body_over_limit": (lambda t: dict(files={"image": ("x.png", os.urandom(2 * 1024 * 1024), "image/png")},
                                       data={"text": "make it red"}), 413, "body_too_large"),
    "empty_text": (lambda t: dict(files={"image": ("x.png", t["reference_png"], "image/png")}, data={"text": "  "}),
                   422, "bad_text"),
    "over_long_text": (lambda t: dict(files={"image": ("x.png", t["reference_png"], "image/png")},
                                      data={"text": "red " * 200}), 422, "bad_text"),
    "top_k_zero": (lambda t: dict(files={"image": ("x.png", t["reference_png"], "image/png")},
                                  data={"text": "make it red", "top_k": "0"}), 422, "bad_top_k"),
    "top_k_too_large": (lambda t: dict(json={"reference_id": t["query"]["reference_id"], "text": "x", "top_k": 10**6}),
                        422, "bad_top_k"),
    "wrong_content_type": (lambda t: dict(data=b"text=make it red", headers={"Content-Type": "text/plain"}),
                           415, "unsupported_media_type"),
    "malformed_json": (lambda t: dict(data=b'{"text": "x", ', headers={"Content-Type": "application/json"}),
                       400, "bad_json"),
    "bad_base64": (lambda t: dict(json={"image": "***not base64***", "text": "x"}), 400, "bad_base64"),
    "missing_image": (lambda t: dict(json={"text": "make it red"}), 422, "missing_image"),
    "unknown_reference": (lambda t: dict(json={"reference_id": "no-such-image", "text": "x"}), 404, "unknown_reference"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_is_a_4xx_and_the_server_keeps_serving(server, trained, name):
    build, status, code = BAD[name]
    response = requests.post(f"{server}/search", timeout=60, **build(trained))
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["message"]
    assert "/tmp" not in response.text and str(REPO) not in response.text  # no file-system paths
    good = search_multipart(server, trained["reference_png"], trained["query"]["text"], top_k=1)
    assert good.status_code == 200 and good.json()["results"][0]["image_id"] == trained["query"]["target_id"]


def test_the_openapi_schema_declares_search_and_every_example_and_error_holds(server, trained):
    from jsonschema import Draft202012Validator
    from openapi_spec_validator import validate
    from referencing import Registry, Resource
    from referencing.jsonschema import DRAFT202012

    spec = requests.get(f"{server}/openapi.json", timeout=30).json()
    validate(spec)  # a valid OpenAPI 3.1 document
    registry = Registry().with_resource("urn:api", Resource.from_contents(spec, default_specification=DRAFT202012))

    def check(instance, schema):  # validates against a schema of the document ($refs resolved in it)
        Draft202012Validator(schema, registry=registry).validate(instance)

    def resolved(schema):
        return {"$ref": "urn:api" + schema["$ref"]} if "$ref" in schema else schema

    search = spec["paths"]["/search"]["post"]
    bodies = search["requestBody"]["content"]
    assert set(bodies) == {"multipart/form-data", "application/json"}
    assert bodies["multipart/form-data"]["schema"]["properties"]["image"]["anyOf"][0]["format"] == "binary"
    success = resolved(search["responses"]["200"]["content"]["application/json"]["schema"])
    sent = 0
    for kind, body in bodies.items():  # one request per declared example, answered as the 200 schema says
        for name, example in body["examples"].items():
            check(example["value"], body["schema"])
            if kind == "application/json":
                response = requests.post(f"{server}/search", json=example["value"], timeout=60)
            else:
                image = base64.b64decode(bodies["application/json"]["examples"]["base64"]["value"]["image"])
                response = requests.post(f"{server}/search", files={"image": ("example.png", image, "image/png")},
                                         data={k: str(v) for k, v in example["value"].items()}, timeout=60)
            assert response.status_code == 200, (kind, name, response.text)
            check(response.json(), success)
            assert len(response.json()["results"]) == example["value"].get("top_k", 10)
            sent += 1
    assert sent == 3
    # every error status is declared with the error model, its example fits it, and a request provoking it gets it
    provoke = {400: BAD["not_an_image"], 404: BAD["unknown_reference"], 413: BAD["body_over_limit"],
               415: BAD["wrong_content_type"], 422: BAD["top_k_zero"]}
    declared = {int(status): answer for status, answer in search["responses"].items() if status != "200"}
    assert set(declared) == set(provoke) | {401, 500, 503}  # 401, 503: test_a_token_guards_every_route_but_healthz,
    assert set(declared[503]["headers"]) == {"Retry-After"}  # test_past_its_queue_the_model_sheds_load
    for path, operations in spec["paths"].items():  # 401 on every route but /healthz, with the bearer scheme
        for operation in operations.values():
            guarded = path != "/healthz"
            assert ("401" in operation["responses"]) == guarded == ("security" in operation), path
    assert spec["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    for status, answer in declared.items():
        schema = resolved(answer["content"]["application/json"]["schema"])
        assert schema == {"$ref": "urn:api#/components/schemas/ErrorResponse"}
        check(answer["content"]["application/json"]["example"], schema)
        if status in provoke:
            build, expected_status, _ = provoke[status]
            response = requests.post(f"{server}/search", timeout=60, **build(trained))
            assert response.status_code == status == expected_status
            check(response.json(), schema)
    docs = requests.get(f"{server}/docs", timeout=30)
    assert docs.status_code == 200 and "/openapi.json" in docs.text and "swagger-ui" in docs.text


def test_health_gallery_thumbnails_and_page(server, trained):
    assert requests.get(f"{server}/healthz", timeout=30).json() == {"status": "ok", "gallery": trained["gallery"],
                                                                    "image_size": 64}
    gallery = requests.get(f"{server}/gallery?limit=5", timeout=30).json()
    assert gallery["total"] == trained["gallery"] and len(gallery["images"]) == 5
    thumb = requests.get(f"{server}/thumbnails/{gallery['images'][0]}", timeout=30)
    assert thumb.headers["content-type"] == "image/jpeg" and Image.open(io.BytesIO(thumb.content)).size == (64, 64)
    assert requests.get(f"{server}/thumbnails/nope", timeout=30).status_code == 404
    page = requests.get(server, timeout=30)
    assert page.status_code == 200 and "DetailFusion" in page.text and 'id="results"' in page.text


def test_a_sharded_index_answers_as_the_whole_one(server, trained, tmp_path):
    """The trained index written as 2 shards and served as a second app: each shard its own deployment, the model
    deployment fans every batch out to both and merges; its answers equal the one-piece server's, for queries
    whose top 40 crosses the shard border."""
    from ray import serve

    from detailfusion.library.config import IndexBackendConfig
    from detailfusion.library.index.store import write_index
    from detailfusion.platform.serving.app import build_app

    write_index(GalleryIndex.load(trained["index"]), tmp_path / "sharded", IndexBackendConfig(shards=2))
    config = ServeConfig(checkpoint=str(trained["model"]), index=str(tmp_path / "sharded"), replica_cpus=0.25,
                         shard_cpus=0.1, frontend_cpus=0.1, max_replicas=1, max_top_k=50)
    serve.run(build_app(config), name="sharded", route_prefix="/sharded")
    try:
        deployments = serve.status().applications["sharded"].deployments
        assert {"IndexShard0", "IndexShard1", "Retriever", "Frontend"} <= set(deployments)
        query, half = trained["query"], trained["gallery"] // 2
        for body in ({"reference_id": query["reference_id"], "text": query["text"], "top_k": 40},
                     {"reference_id": query["target_id"], "text": "make it blue", "top_k": 40}):
            whole = requests.post(f"{server}/search", json=body, timeout=60).json()["results"]
            sharded = requests.post(f"{server}/sharded/search", json=body, timeout=60).json()["results"]
            assert [r["image_id"] for r in sharded] == [r["image_id"] for r in whole]
            assert [r["score"] for r in sharded] == pytest.approx([r["score"] for r in whole], abs=1e-5)
            rows = [GalleryIndex.load(trained["index"]).position[r["image_id"]] for r in whole]
            assert min(rows) < half <= max(rows)  # both shards contributed
    finally:
        serve.delete("sharded")


def test_search_settings_are_set_per_deployment_without_a_rebuild(server, trained, tmp_path):
    """A compressed index built with deliberately starved search settings (1 list of 4, 1 token hit, 1 image
    re-ranked) misses much of exact search's top 10; served with ``search:`` settings that scan every list and hit
    and re-rank every candidate, the same files answer exactly as the exact index's server, and nothing in the index
    directory was written."""
    from ray import serve

    from detailfusion.library.config import CompressedIndexConfig, IndexBackendConfig, SearchSettings
    from detailfusion.library.index.store import open_index, write_index
    from detailfusion.platform.serving.app import build_app

    starved = CompressedIndexConfig(nlist=4, m=16, nbits=4, nprobe=1, candidates=1, rerank=1, store_dtype="float32")
    exact = GalleryIndex.load(trained["index"])
    directory = tmp_path / "ivfpq"
    write_index(exact, directory, IndexBackendConfig(kind="ivfpq", ivfpq=starved))
    before = {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in directory.iterdir()}
    queries = torch.nn.functional.normalize(torch.randn(16, exact.embeddings.shape[2],
                                                        generator=torch.Generator().manual_seed(0)), dim=-1)
    top = exact.search(queries, 10)[1]
    as_built = open_index(directory).search(queries, 10)[1]
    assert (as_built != top).any(), "the starved settings should miss some of the exact top 10"
    everything = SearchSettings(nprobe=4, candidates=10**6, rerank=0)
    assert torch.equal(open_index(directory, search=everything).search(queries, 10)[1], top)

    config = ServeConfig(checkpoint=str(trained["model"]), index=str(directory), replica_cpus=0.25,
                         frontend_cpus=0.1, max_replicas=1, max_top_k=50, search=everything)
    serve.run(build_app(config), name="retuned", route_prefix="/retuned")
    try:
        query = trained["query"]
        for body in ({"reference_id": query["reference_id"], "text": query["text"], "top_k": 20},
                     {"reference_id": query["target_id"], "text": "make it blue", "top_k": 20}):
            whole = requests.post(f"{server}/search", json=body, timeout=60).json()["results"]
            retuned = requests.post(f"{server}/retuned/search", json=body, timeout=60).json()["results"]
            assert [r["image_id"] for r in retuned] == [r["image_id"] for r in whole]
    finally:
        serve.delete("retuned")
    assert {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in directory.iterdir()} == before
    with pytest.raises(ConfigError, match="apply to a compressed"):
        build_app(ServeConfig(checkpoint=str(trained["model"]), index=str(trained["index"]),
                              search=SearchSettings(nprobe=8)))


def running_replicas(app: str, deployment: str) -> int:
    from ray import serve

    status = serve.status().applications.get(app)
    return status.deployments[deployment].replica_states.get("RUNNING", 0) if status else 0


def test_a_killed_shard_replica_is_replaced_under_load(server, trained, tmp_path):
    """Two replicas per deployment, 8 clients posting searches; one replica of shard 0 is killed mid-load: Serve
    starts another, the only server errors are requests that were in flight on the dead one (at most its
    max_ongoing_requests, 8), and every request once it is replaced succeeds."""
    import threading
    import time

    import ray
    from ray import serve

    from detailfusion.library.config import IndexBackendConfig
    from detailfusion.library.index.store import write_index
    from detailfusion.platform.serving.app import build_app

    write_index(GalleryIndex.load(trained["index"]), tmp_path / "sharded", IndexBackendConfig(shards=2))
    config = ServeConfig(checkpoint=str(trained["model"]), index=str(tmp_path / "sharded"), replica_cpus=0.2,
                         shard_cpus=0.05, frontend_cpus=0.1, min_replicas=2, max_replicas=2, max_top_k=50)
    serve.run(build_app(config), name="shardkill", route_prefix="/shardkill")
    query, statuses, stop = trained["query"], [], threading.Event()
    body = {"reference_id": query["reference_id"], "text": query["text"], "top_k": 5}

    def client():
        while not stop.is_set():
            try:
                code = requests.post(f"{server}/shardkill/search", json=body, timeout=60).status_code
            except requests.RequestException:
                code = 599  # no answer counts as a server error
            statuses.append((time.monotonic(), code))

    threads = [threading.Thread(target=client, daemon=True) for _ in range(8)]
    try:
        assert running_replicas("shardkill", "IndexShard0") == 2
        for thread in threads:
            thread.start()
        time.sleep(3)
        victims = [a for a in ray.util.list_named_actors(all_namespaces=True) if "IndexShard0" in a["name"]]
        assert len(victims) == 2, victims
        ray.kill(ray.get_actor(victims[0]["name"], namespace=victims[0]["namespace"]), no_restart=True)
        killed_at = time.monotonic()
        while running_replicas("shardkill", "IndexShard0") == 2 and time.monotonic() < killed_at + 30:
            time.sleep(0.2)  # the controller notices the death
        deadline = time.monotonic() + 120
        while running_replicas("shardkill", "IndexShard0") < 2:
            assert time.monotonic() < deadline, "the killed replica was not replaced within 2 minutes"
            time.sleep(0.5)
        replaced_at = time.monotonic()
        time.sleep(3)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
        serve.delete("shardkill")
    errors = [code for _, code in statuses if code >= 500]
    after = [code for t, code in statuses if t > replaced_at + 1]
    print(f"shard replica killed under load: {len(statuses)} requests, {len(errors)} server errors, replaced in "
          f"{replaced_at - killed_at:.1f} s")
    assert len(errors) <= 8, errors
    assert after and all(code == 200 for code in after), after


def test_placement_on_nodes_is_checked_before_any_replica_starts(trained, tmp_path):
    """shard_nodes place a sharded index's shards (refused for an index in one piece); a node resource that no node
    offers is refused by name, not left to wait for a node for ever."""
    from detailfusion.platform.serving.app import build_app, check_placement

    with pytest.raises(ConfigError, match="shard_nodes \\['a'\\] place the shards of a sharded index"):
        build_app(ServeConfig(checkpoint=str(trained["model"]), index=str(trained["index"]), shard_nodes=("a",)))
    with pytest.raises(ConfigError, match="no node offers shard_nodes\\[1\\]='rack-b', model_node='gpu'"):
        check_placement(ServeConfig(shard_nodes=("CPU", "rack-b"), model_node="gpu"))
    check_placement(ServeConfig(shard_nodes=("CPU",)))  # offered: passes


def find_chromium() -> str | None:
    return next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)


def test_search_page_in_headless_chromium(server, trained, tmp_path):
    browser = find_chromium()
    if browser is None:
        missing_prerequisite("chromium not installed (apt-get install chromium; .ci/run installs it)")
    query = trained["query"]
    url = f"{server}/?" + requests.compat.urlencode({"reference": query["reference_id"], "text": query["text"],
                                                     "top_k": 4})
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
             "--window-size=1100,900", "--virtual-time-budget=20000", f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([browser, *flags, "--dump-dom", url], capture_output=True, text=True, timeout=120)
    assert 'data-searched="true"' in dom.stdout, dom.stderr[-2000:]
    assert dom.stdout.count('class="result"') == 4 and f'data-image-id="{query["target_id"]}"' in dom.stdout
    shot = Path(os.environ.get("DETAILFUSION_ARTIFACTS", tmp_path)) / "search_page.png"
    shot.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([browser, *flags, f"--screenshot={shot}", url], capture_output=True, timeout=120)
    assert shot.is_file() and Image.open(shot).size == (1100, 900)
    print(f"search page screenshot: {shot}")


def test_echoed_input_is_cut_to_a_short_prefix(server):
    """A 100,000-character reference_id (and other over-long values) comes back as a prefix and its length."""
    huge = "x" * 100_000
    cases = [requests.post(f"{server}/search", json={"reference_id": huge, "text": "red"}, timeout=60),
             requests.post(f"{server}/search", json={"reference_id": "a", "text": "red", "top_k": "9" * 100_000},
                           timeout=60),
             requests.post(f"{server}/search", data=b"x", headers={"Content-Type": "a" * 5000}, timeout=60),
             requests.get(f"{server}/thumbnails/{'y' * 5000}", timeout=60),
             requests.get(f"{server}/no-such-route-{'z' * 5000}", timeout=60),
             requests.get(f"{server}/gallery?offset={'w' * 5000}", timeout=60)]
    statuses = [(r.status_code, r.json()["error"]["code"]) for r in cases]
    assert statuses == [(404, "unknown_reference"), (422, "bad_top_k"), (415, "unsupported_media_type"),
                        (404, "unknown_image"), (404, "not_found"), (422, "bad_parameter")]
    for response in cases:
        message = response.json()["error"]["message"]
        assert len(message) < 200, message
    assert "(100000 characters)" in cases[0].json()["error"]["message"]
    assert "(100000 characters)" in cases[1].json()["error"]["message"]


@pytest.fixture(scope="module")
def guarded(server, trained, tmp_path_factory):
    """A second app of the same model at /guarded: an API token from a file, and room for one search in the model
    replica and one waiting (batching off), so a burst must be shed."""
    from ray import serve

    from detailfusion.platform.serving.app import build_app

    token = tmp_path_factory.mktemp("token") / "token"
    token.write_text("s3cret-token\n")
    config = ServeConfig(checkpoint=str(trained["model"]), index=str(trained["index"]), replica_cpus=0.2,
                         frontend_cpus=0.05, max_replicas=1, batching=False, max_ongoing_requests=1,
                         max_queued_requests=1, retry_after_s=1.5, api_token_file=str(token))
    serve.run(build_app(config), name="guarded", route_prefix="/guarded")
    yield f"{server}/guarded", {"Authorization": "Bearer s3cret-token"}
    serve.delete("guarded")


def test_a_token_guards_every_route_but_healthz(guarded, trained):
    url, auth = guarded
    body = {"reference_id": trained["query"]["reference_id"], "text": trained["query"]["text"], "top_k": 3}
    assert requests.get(f"{url}/healthz", timeout=30).status_code == 200  # open: a load balancer's probe
    refused = {"no token": {}, "wrong token": {"Authorization": "Bearer s3cret-tokeN"},
               "not bearer": {"Authorization": "Basic s3cret-token"}, "bare token": {"Authorization": "s3cret-token"}}
    for name, headers in refused.items():
        for method, path in (("post", "/search"), ("get", "/gallery"), ("get", "/"), ("get", "/docs"),
                             ("get", "/openapi.json"), ("get", f"/thumbnails/{trained['query']['reference_id']}"),
                             ("get", "/static-offline-docs/swagger-ui.css"), ("get", "/no-such-route")):
            response = requests.request(method, f"{url}{path}", json=body, headers=headers, timeout=30)
            assert response.status_code == 401, (name, path, response.status_code)
            assert response.json()["error"]["code"] == "unauthorized"
            assert response.headers["WWW-Authenticate"] == "Bearer"
    search = requests.post(f"{url}/search", json=body, headers=auth, timeout=60)
    assert search.status_code == 200 and len(search.json()["results"]) == 3
    assert requests.get(f"{url}/gallery", headers=auth, timeout=30).json()["total"] == trained["gallery"]
    assert requests.get(f"{url}/docs", headers=auth, timeout=30).status_code == 200


def test_past_its_queue_the_model_sheds_load(guarded, trained):
    """48 searches from 24 clients at once on 1 running + 1 queued: the rest are answered 503 with Retry-After in the
    error shape, none otherwise; the server then answers again."""
    from concurrent.futures import ThreadPoolExecutor

    url, auth = guarded
    body = {"reference_id": trained["query"]["reference_id"], "text": trained["query"]["text"], "top_k": 3}
    with ThreadPoolExecutor(24) as pool:
        answers = list(pool.map(lambda _: requests.post(f"{url}/search", json=body, headers=auth, timeout=60),
                                range(48)))
    statuses = [a.status_code for a in answers]
    print(f"shedding: {statuses.count(200)} answered, {statuses.count(503)} shed of {len(statuses)}")
    assert set(statuses) == {200, 503}, statuses
    for answer in answers:
        if answer.status_code == 503:  # retry_after_s 1.5, rounded up
            assert answer.json()["error"]["code"] == "overloaded" and answer.headers["Retry-After"] == "2"
        else:
            assert len(answer.json()["results"]) == 3
    assert requests.post(f"{url}/search", json=body, headers=auth, timeout=60).status_code == 200


def test_api_docs_render_offline_in_headless_chromium(server, tmp_path):
    """/docs loads Swagger UI from the package's own files: with every host but 127.0.0.1 unresolvable, Chromium
    renders the operation list (POST /search among them)."""
    browser = find_chromium()
    if browser is None:
        missing_prerequisite("chromium not installed (apt-get install chromium; .ci/run installs it)")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
             "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1", "--virtual-time-budget=20000",
             f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([browser, *flags, "--dump-dom", f"{server}/docs"], capture_output=True, text=True,
                         timeout=120).stdout
    assert 'class="swagger-ui' in dom and "opblock-post" in dom, dom[-2000:]
    assert 'data-path="/search"' in dom and 'data-path="/healthz"' in dom
    page = requests.get(f"{server}/docs", timeout=30).text
    assert "://" not in page  # every asset from this server (relative URLs), none from a CDN
