"""Catalogue-scale retrieval: the compressed index (``CompressedIndex``: FAISS IVF-PQ candidates over the token
vectors, exact re-ranking from a memory-mapped store, float16 or ``--store-dtype int8``) against exact search, on a
synthetic gallery with structure, in one run.

The gallery, per branch (gm, di) independently, in D dims: ``--concepts`` unit "concept" directions, drawn at
random. Each image takes ``--concepts-per-image`` of them, one image offset (a random Gaussian vector of norm about
``--image-noise``, shared by its tokens) and, per token, one of its concepts plus token noise (norm about
``--token-noise``); each token is L2-normalised per branch and the unified tokens are ``[t_gm ; t_di] / sqrt 2``,
made 1,024 images at a time (seeded per chunk) and never stored whole: each chunk goes, rounded to float16 as the
re-ranking store keeps it, into the index's writers (``IndexWriter``, one per shard; the codec is trained on the
first images' tokens, a fair sample since images are drawn independently) and into the exact reference. A query
aims at a random image: per branch the mean of that image's concepts plus noise (``--query-noise``), normalised,
blended with weights ``(a, 1 - a)``, a uniform in [0.2, 0.8], by the fusion rule (``model/fusion.py``'s
``fused_query``).

A query scores the same for every image holding one of its concepts (a max over tokens counts one), so the exact
top-50 is decided by the noise among hundreds of near ties per concept (N = 20,000: about 600 images per branch):
a hard case for approximate search, whose recall needs hits in proportion to N.

The exact reference is the exact top-50 (``RunningTopK``, ``GalleryIndex.search``'s answer) over the same float16
values as they are made. Reported, for each ``nprobe:candidates[:rerank]`` setting: recall@10 and recall@50 (the
share of the exact top-10 / top-50 in the index's top-10 / top-50, all queries); ``recall_tol@10``/``@50``, the same
with ann-benchmarks' tolerance (a returned image counts when its distance, 1 - fused score, is within 1 + 1e-3 of
the exact k-th one: swaps of equal images are not errors); ``task_recall@10``/``@50``, the share of queries whose
planted target (the image the query was drawn near) the index returns, beside ``exact_task_recall`` (exact
search's, on the same queries); the latency of one query at a time inside the index (top-50; p50, p99 over
``--latency-queries``; several shards are searched in parallel, one thread each, as Serve fans out to one deployment
per shard; in one piece also the candidate stage alone and the mean number of images re-ranked), what the store alone
allows (``store_limits``: the exact score gap between ranks 10 and 11, the store's score error on the exact
top-10, and with ``--store-ceiling`` the recall when every image is re-ranked from the store), plus build time (codec
training, coding and storing, writing; generation and the exact reference timed apart), RAM bytes per image (the
FAISS indexes), disk bytes per image (the re-ranking store) and the peak RSS. With ``--endpoint``: the same index
behind the Serve app (``detailfusion serve``'s: frontend, one model replica of an untrained tiny-architecture model
of the gallery's shape, one deployment per shard, each searching at the first setting), POST /search p50/p99 at
concurrency 1 and 16 and queries/s at 16. Printed as a table and written as JSON (``--out``).

    python benchmarks/catalogue.py --images 20000 [--queries 1000] [--dim 256] [--tokens 32] [--shards 1]
        [--settings 64:8192:512 64:2048] [--m 32] [--nlist N] [--train-sample 262144] [--store-dtype int8]
        [--store-ceiling] [--endpoint] [--reuse]
        [--workdir DIR] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from detailfusion.library.index.compressed import (
    Codec,
    CompressedIndex,
    CompressedIndexConfig,
    IndexWriter,
    RunningTopK,
)
from detailfusion.library.index.exact import IMAGES_FILE, concat_images
from detailfusion.library.index.sharded import shard_bounds, shard_name
from detailfusion.library.index.store import open_index, write_sharded_meta
from detailfusion.library.model.fusion import DEFAULT_FUSION_RULE, FUSION_RULES, fused_query

CHUNK = 1024  # images generated (and exactly scored) at a time
EXACT_DEPTH = 256  # the exact reference's list per query: top-50 and every image within tolerance of its 50th
EPSILON = 1e-3  # ann-benchmarks' tolerance


class Concepts:
    """The gallery's generator: concept directions [C, D] per branch and each image's concepts [N, P] per branch."""

    def __init__(self, args):
        rng = np.random.default_rng(args.seed)
        self.args = args
        self.directions = [F.normalize(torch.from_numpy(rng.standard_normal((args.concepts, args.dim),
                                                                            dtype=np.float32)), dim=-1)
                           for _ in range(2)]
        self.chosen = [rng.integers(args.concepts, size=(args.images, args.concepts_per_image)) for _ in range(2)]

    def tokens(self, rows: slice, seed: int) -> torch.Tensor:
        """Unified tokens [n, Nq, 2D] float32 of images ``rows``."""
        args, rng = self.args, np.random.default_rng(seed)
        count, halves = rows.stop - rows.start, []
        for directions, chosen in zip(self.directions, self.chosen):
            pick = np.take_along_axis(chosen[rows], rng.integers(args.concepts_per_image, size=(count, args.tokens)), 1)
            image = gaussian(rng, (count, 1, args.dim), args.image_noise)
            token = gaussian(rng, (count, args.tokens, args.dim), args.token_noise)
            halves.append(F.normalize(directions[torch.from_numpy(pick)] + image + token, dim=-1))
        return torch.cat(halves, dim=-1) / math.sqrt(2)

    def queries(self, rule: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(unified queries [Q, 2D], each near a random image's concepts; that image's row [Q]: the planted target)."""
        args = self.args
        rng = np.random.default_rng(args.seed + 1)
        targets = rng.integers(args.images, size=args.queries)
        branches = [F.normalize(directions[torch.from_numpy(chosen[targets])].mean(dim=1)
                                + gaussian(rng, (args.queries, args.dim), args.query_noise), dim=-1)
                    for directions, chosen in zip(self.directions, self.chosen)]
        a = torch.from_numpy(rng.uniform(0.2, 0.8, size=(args.queries, 1)).astype(np.float32))
        return fused_query(*branches, torch.cat([a, 1 - a], dim=1), rule), torch.from_numpy(targets)


def gaussian(rng, shape: tuple, norm: float) -> torch.Tensor:
    """Random Gaussian vectors along the last axis with norms about ``norm``."""
    return torch.from_numpy(rng.standard_normal(shape, dtype=np.float32)) * (norm / math.sqrt(shape[-1]))


def recall(found: torch.Tensor, exact: torch.Tensor) -> float:
    """The share of each query's exact list [Q, k] that ``found`` [Q, k] holds, averaged over queries."""
    return sum(len(set(a) & set(b)) for a, b in zip(found.tolist(), exact.tolist())) / exact.numel()


def tolerance_recall(found: torch.Tensor, exact: torch.Tensor, exact_scores: torch.Tensor, k: int,
                     epsilon: float = EPSILON) -> tuple[float, int]:
    """ann-benchmarks' recall with tolerance: a returned image [Q, k] counts when its distance is within
    (1 + epsilon) of the exact k-th one, the distance being 1 - fused score: score >= 1 - (1 + epsilon) (1 - s_k).
    ``exact`` / ``exact_scores`` [Q, EXACT_DEPTH]: the exact list, deep enough to hold every image that qualifies.
    Returns (the recall, the queries whose qualifying images may run past the exact list: then undercounted)."""
    bar = 1 - (1 + epsilon) * (1 - exact_scores[:, k - 1:k])  # [Q, 1]
    hits, past = 0, int((exact_scores[:, -1:] >= bar).sum())
    for row, ids, scores, limit in zip(found[:, :k].tolist(), exact.tolist(), exact_scores.tolist(), bar[:, 0].tolist()):
        allowed = {i for i, score in zip(ids, scores) if score >= limit}
        hits += sum(i in allowed for i in row)
    return hits / found[:, :k].numel(), past


def task_recall(found: torch.Tensor, targets: torch.Tensor, k: int) -> float:
    """The share of queries whose planted target [Q] is in the list's top ``k`` [Q, >= k]."""
    return float((found[:, :k] == targets[:, None]).any(dim=1).double().mean())


def latencies(fn, queries: torch.Tensor) -> dict:
    """p50 / p99 milliseconds of ``fn`` on one query at a time."""
    times = []
    for q in queries.split(1):
        start = time.perf_counter()
        fn(q)
        times.append(time.perf_counter() - start)
    return {"p50_ms": float(np.percentile(times, 50)) * 1e3, "p99_ms": float(np.percentile(times, 99)) * 1e3}


def measure(index, queries: torch.Tensor, exact: torch.Tensor, exact_scores: torch.Tensor, targets: torch.Tensor,
            setting: dict, timed: int) -> dict:
    """At one search setting: recall of the exact top-10 / top-50 (all queries), with ann-benchmarks' tolerance,
    and task recall (the planted target found) beside exact search's; one-query latencies (the first ``timed``;
    shards searched in parallel, as Serve fans out); the candidate stage alone where the index is in one piece."""
    nprobe, candidates, rerank = setting["nprobe"], setting["candidates"], setting["rerank"]
    keep = max(rerank, 50) if rerank else None
    found = index.search(queries, 50, **setting)[1]
    whole = latencies(lambda q: index.search(q, 50, **setting), queries[:timed])
    row = {**setting, "recall@10": recall(found[:, :10], exact[:, :10]), "recall@50": recall(found, exact[:, :50])}
    for k in (10, 50):
        row[f"recall_tol@{k}"], row[f"tolerance_past_list@{k}"] = tolerance_recall(found, exact, exact_scores, k)
        row[f"task_recall@{k}"], row[f"exact_task_recall@{k}"] = task_recall(found, targets, k), task_recall(exact, targets, k)
    row.update(search_p50_ms=whole["p50_ms"], search_p99_ms=whole["p99_ms"])
    if isinstance(index, CompressedIndex):
        images = [len(c) for c in index.candidates(queries, candidates, nprobe, keep)]
        stage = latencies(lambda q: index.candidates(q, candidates, nprobe, keep), queries[:timed])
        row.update(reranked_images_mean=float(np.mean(images)), candidates_p50_ms=stage["p50_ms"],
                   candidates_p99_ms=stage["p99_ms"])
    return row


def store_limits(index, queries: torch.Tensor, exact: torch.Tensor, exact_scores: torch.Tensor,
                 ceiling: bool) -> dict:
    """What the re-ranking store alone allows, apart from candidate generation: the exact score gap between ranks 10
    and 11 (median, 10th percentile over queries: the margin a re-ranking score must keep), the store's score error
    on each query's exact top-10 images (its fusion score from the store minus the exact one: sd, largest |error|)
    and, with ``ceiling``, recall@10/@50 when every image is re-ranked from the store (a scan of the whole store)."""
    shards = getattr(index, "shards", [index])
    offsets = getattr(index, "offsets", [0])
    gaps = (exact_scores[:, 9] - exact_scores[:, 10]).numpy()
    errors = []
    for q, (rows, want) in enumerate(zip(exact[:, :10].tolist(), exact_scores[:, :10])):
        got = torch.empty(10)
        for n, row in enumerate(rows):
            s = int(np.searchsorted(offsets, row, side="right")) - 1
            got[n] = shards[s].scores(queries[q], np.array([row - offsets[s]]))[0]
        errors.append((got - want).numpy())
    errors = np.concatenate(errors)
    limits = {"gap_10_11": {"median": float(np.median(gaps)), "p10": float(np.percentile(gaps, 10))},
              "store_error_top10": {"sd": float(errors.std()), "max_abs": float(np.abs(errors).max())}}
    if ceiling:
        running = RunningTopK(queries, 50, shards[0].fusion_score)
        for shard, offset in zip(shards, offsets):
            for start in range(0, len(shard), CHUNK):
                running.add(offset + start, shard.tokens(slice(start, min(start + CHUNK, len(shard)))))
        found = running.result()[1]
        limits.update({"store_recall@10": recall(found[:, :10], exact[:, :10]),
                       "store_recall@50": recall(found, exact[:, :50])})
    return limits


def build(concepts: Concepts, directory: Path, config: CompressedIndexConfig, shards: int, fingerprint: str,
          queries: torch.Tensor) -> dict:
    """The gallery made chunk by chunk (never stored whole; float16 as the store keeps it) into ``shards``
    ``IndexWriter`` s (one codec, trained on the first images' tokens: the images are i.i.d.), and the exact top
    ``EXACT_DEPTH`` of ``queries`` on the same values as they pass. Returns the seconds of each part and the exact lists."""
    args = concepts.args
    times = {"generate_s": 0.0, "build_s": 0.0, "exact_reference_s": 0.0}

    def chunk(start: int) -> torch.Tensor:
        begin = time.perf_counter()
        rows = slice(start, min(start + CHUNK, args.images))
        values = concepts.tokens(rows, seed=args.seed + 2 + start // CHUNK).half().float()  # the store's values
        times["generate_s"] += time.perf_counter() - begin
        return values

    bounds = shard_bounds(args.images, shards)
    config = config.resolved(max(b - a for a, b in bounds) * (config.pool or args.tokens), args.dim)
    sample_images = min(args.images, math.ceil(config.train_sample / (config.pool or args.tokens)))
    sample = torch.cat([chunk(start) for start in range(0, sample_images, CHUNK)])[:sample_images]
    begin = time.perf_counter()
    codec = Codec.train(sample, max(b - a for a, b in bounds) * args.tokens, config, args.rule)
    times["build_s"] += time.perf_counter() - begin
    del sample
    sharded = shards > 1
    writers = [IndexWriter(directory / shard_name(s) if sharded else directory, codec, b - a, fingerprint)
               for s, (a, b) in enumerate(bounds)]
    running = RunningTopK(queries, EXACT_DEPTH, args.rule)
    report = time.perf_counter()
    for start in range(0, args.images, CHUNK):
        values = chunk(start)
        begin = time.perf_counter()
        for writer, (a, b) in zip(writers, bounds):
            lo, hi = max(a, start), min(b, start + len(values))
            if lo < hi:
                writer.add(np.arange(lo - a, hi - a), values[lo - start:hi - start].numpy())
        times["build_s"] += time.perf_counter() - begin
        begin = time.perf_counter()
        running.add(start, values)
        times["exact_reference_s"] += time.perf_counter() - begin
        if time.perf_counter() - report > 60:
            print(f"  {start + len(values):,} of {args.images:,} images ({times})", flush=True)
            report = time.perf_counter()
    begin = time.perf_counter()
    ids = [str(n) for n in range(args.images)]
    for writer, (a, b) in zip(writers, bounds):
        writer.finish(ids[a:b], source={"benchmark": "catalogue", "rows": [a, b]})
    if sharded:
        concat_images([directory / shard_name(s) / IMAGES_FILE for s in range(shards)], directory / IMAGES_FILE)
        write_sharded_meta(directory, "ivfpq", bounds, fingerprint, args.rule, {"benchmark": "catalogue"})
    times["build_s"] += time.perf_counter() - begin
    exact_scores, exact = running.result()
    return {**times, "exact": exact, "exact_scores": exact_scores}


def build_args(args) -> dict:
    """The arguments that decide the gallery, the queries and the built index (not the search settings)."""
    keep = ("images", "queries", "dim", "tokens", "rule", "concepts", "concepts_per_image", "image_noise",
            "token_noise", "query_noise", "m", "nbits", "nlist", "train_sample", "store_dtype", "pool", "shards", "seed")
    return {name: getattr(args, name) for name in keep} | {"served": args.settings[0], "exact_depth": EXACT_DEPTH}


def shaped_model(args, directory: Path) -> str:
    """An untrained tiny-architecture model whose embeddings have the gallery's shape (Nq tokens, D per branch), for
    the endpoint: the Serve app refuses an index another model built."""
    from detailfusion.library.model import build_model, model_fingerprint, save_model

    torch.manual_seed(args.seed)
    save_model(*build_model("tiny", embed_dim=args.dim, num_query_tokens=args.tokens), directory)
    return model_fingerprint(directory)


def endpoint(args, model_dir: Path, index_dir: Path, requests_per_client: int) -> dict:
    """p50/p99 of POST /search (top_k 50) at concurrency 1 and 16 through the Serve app (frontend, model replica,
    one deployment per shard) on this machine; queries/s at 16."""
    import base64
    import io
    import socket
    from concurrent.futures import ThreadPoolExecutor

    import requests
    from PIL import Image
    from ray import serve

    from detailfusion.library.config import ServeConfig
    from detailfusion.library.model.inference import image_size
    from detailfusion.platform.serving.run import start

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    side, rng = image_size(str(model_dir)), np.random.default_rng(args.seed)
    bodies = []
    for n in range(64):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)).save(buffer, "PNG")
        bodies.append({"image": base64.b64encode(buffer.getvalue()).decode(), "text": f"make it number {n}", "top_k": 50})
    config = ServeConfig(checkpoint=str(model_dir), index=str(index_dir), port=port, num_cpus=args.threads,
                         min_replicas=1, max_replicas=1, replica_cpus=0.5, shard_cpus=0.5, batch_wait_timeout_s=0.002)
    start(config, name="catalogue")
    url = f"http://127.0.0.1:{port}/search"
    try:
        session = requests.Session()

        def one(body: dict, client=None) -> float:
            begin = time.perf_counter()
            response = (client or session).post(url, json=body, timeout=60)
            response.raise_for_status()
            return time.perf_counter() - begin

        for body in bodies[:8]:
            one(body)  # warm-up
        single = [one(bodies[n % len(bodies)]) for n in range(args.latency_queries)]

        def client(c: int) -> list[float]:
            own = requests.Session()
            return [one(bodies[(c * 7 + n) % len(bodies)], own) for n in range(requests_per_client)]

        begin = time.perf_counter()
        with ThreadPoolExecutor(16) as pool:
            parallel = [t for times in pool.map(client, range(16)) for t in times]
        seconds = time.perf_counter() - begin
    finally:
        serve.shutdown()
    ms = lambda times, q: float(np.percentile(times, q)) * 1e3  # noqa: E731
    return {"concurrency_1": {"p50_ms": ms(single, 50), "p99_ms": ms(single, 99), "requests": len(single)},
            "concurrency_16": {"p50_ms": ms(parallel, 50), "p99_ms": ms(parallel, 99), "requests": len(parallel),
                               "queries_per_s": len(parallel) / seconds}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, required=True, help="gallery size N")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--latency-queries", type=int, default=200, help="queries timed one at a time")
    parser.add_argument("--dim", type=int, default=256, help="branch width D (unified width 2D)")
    parser.add_argument("--tokens", type=int, default=32, help="tokens per image Nq")
    parser.add_argument("--rule", default=DEFAULT_FUSION_RULE, choices=FUSION_RULES.names())
    parser.add_argument("--concepts", type=int, default=512, help="concept directions per branch")
    parser.add_argument("--concepts-per-image", type=int, default=4)
    parser.add_argument("--image-noise", type=float, default=0.5)
    parser.add_argument("--token-noise", type=float, default=0.5)
    parser.add_argument("--query-noise", type=float, default=0.5)
    defaults = CompressedIndexConfig()
    parser.add_argument("--m", type=int, default=defaults.m, help="PQ code bytes per token per branch")
    parser.add_argument("--nbits", type=int, default=defaults.nbits)
    parser.add_argument("--nlist", type=int, default=defaults.nlist, help="default: automatic (see the config)")
    parser.add_argument("--train-sample", type=int, default=defaults.train_sample)
    parser.add_argument("--store-dtype", default=defaults.store_dtype, choices=["float16", "float32", "int8"],
                        help="the re-ranking store's dtype (the exact reference is on float16 values either way)")
    parser.add_argument("--settings", nargs="+", default=["64:8192:512", "64:2048"],
                        help="nprobe:candidates[:rerank] to measure (rerank: images re-ranked, at least 50; 0: all)")
    parser.add_argument("--shards", type=int, default=1, help="index shards (the endpoint: one deployment each)")
    parser.add_argument("--pool", type=int, default=defaults.pool, help="pooled vectors per image and FAISS index "
                        "(token pooling; 0: every token)")
    parser.add_argument("--store-ceiling", action="store_true", help="also re-rank every image from the store (a full "
                        "scan): the recall the store allows with every candidate")
    parser.add_argument("--endpoint", action="store_true", help="also time POST /search through Ray Serve")
    parser.add_argument("--endpoint-requests", type=int, default=25, help="requests per client at concurrency 16")
    parser.add_argument("--reuse", action="store_true", help="reuse the index a finished run of the same gallery and "
                        "build arguments left in --workdir (only the measurements run again)")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, help="kept (gallery, index); default: a temporary folder, removed")
    parser.add_argument("--out", type=Path, help="JSON results (default: catalogue_<N>.json in the temp dir)")
    args = parser.parse_args()
    settings = [dict(zip(("nprobe", "candidates", "rerank"), [int(n) for n in s.split(":")] + [0]))
                for s in args.settings]
    import faiss

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="catalogue-"))
    workdir.mkdir(parents=True, exist_ok=True)
    out = args.out or Path(tempfile.gettempdir()) / f"catalogue_{args.images}.json"
    try:
        concepts = Concepts(args)
        queries, targets = concepts.queries(args.rule)
        fingerprint = shaped_model(args, workdir / "model")  # always: a kept build can serve a later --endpoint run
        served = settings[0]  # the index's own search setting: what the endpoint uses
        config = CompressedIndexConfig(nlist=args.nlist, m=args.m, nbits=args.nbits, train_sample=args.train_sample,
                                       seed=args.seed, nprobe=served["nprobe"], candidates=served["candidates"],
                                       rerank=served["rerank"], store_dtype=args.store_dtype, pool=args.pool)
        built = workdir / "built.json"  # with exact_top.npy: a finished build of these arguments, reused
        kept = [built, workdir / "exact_top.npy", workdir / "exact_top_scores.npy"]
        if args.reuse and all(p.is_file() for p in kept) and json.loads(built.read_text())["args"] == build_args(args):
            made, exact = json.loads(built.read_text())["made"], torch.from_numpy(np.load(workdir / "exact_top.npy"))
            exact_scores = torch.from_numpy(np.load(workdir / "exact_top_scores.npy"))
            print(f"reusing the index built in {workdir}: {made}", flush=True)
        else:
            built.unlink(missing_ok=True)
            made = build(concepts, workdir / "index", config, args.shards, fingerprint, queries)
            exact, exact_scores = made.pop("exact"), made.pop("exact_scores")
            np.save(workdir / "exact_top.npy", exact.numpy())
            np.save(workdir / "exact_top_scores.npy", exact_scores.numpy())
            built.write_text(json.dumps({"args": build_args(args), "made": made}))
            print(f"built: { {k: round(v, 1) for k, v in made.items()} }", flush=True)
        index = open_index(workdir / "index", fingerprint)
        shards = getattr(index, "shards", [index])
        rows = []
        for setting in settings:
            rows.append(measure(index, queries, exact, exact_scores, targets, setting, args.latency_queries))
            print(f"measured: {rows[-1]}", flush=True)
        limits = store_limits(index, queries, exact, exact_scores, args.store_ceiling)
        print(f"store limits: {limits}", flush=True)
        ram, disk = sum(s.memory_bytes() for s in shards), sum(s.store_bytes() for s in shards)
        nlist = shards[0].config.nlist
        resident = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        del index, shards
        out.write_text(json.dumps({"settings": rows, **made, "ram_bytes": ram, "store_bytes": disk}, indent=1))
        served_figures = None
        if args.endpoint:
            try:
                served_figures = endpoint(args, workdir / "model", workdir / "index", args.endpoint_requests)
            except Exception as exc:  # noqa: BLE001  (the in-index figures are kept; the failure is reported)
                served_figures = {"error": repr(exc)}
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)

    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {args.threads} threads; torch {torch.__version__}, "
                   f"faiss {faiss.__version__}",
        "gallery": {"images": args.images, "tokens": args.tokens, "dim": args.dim, "rule": args.rule,
                    "concepts": args.concepts, "concepts_per_image": args.concepts_per_image,
                    "image_noise": args.image_noise, "token_noise": args.token_noise,
                    "query_noise": args.query_noise, "queries": args.queries, "seed": args.seed},
        "config": {**asdict(config), "nlist": nlist}, "shards": args.shards, **made,
        "ram_bytes_per_image": ram / args.images, "disk_bytes_per_image": disk / args.images,
        "peak_rss_bytes": resident, "store_limits": limits, "settings": rows, "endpoint": served_figures,
    }
    out.write_text(json.dumps(result, indent=1))
    print(result["machine"])
    print(f"gallery {args.images:,} images x {args.tokens} tokens x 2 x {args.dim} ({args.rule}); {args.queries} "
          f"queries; {args.shards} shard(s), nlist {nlist}, m {args.m}, nbits {args.nbits}, store {args.store_dtype}")
    print(f"build {made['build_s']:.1f} s (beside it: generate {made['generate_s']:.1f} s, exact reference "
          f"{made['exact_reference_s']:.1f} s); FAISS RAM {result['ram_bytes_per_image']:,.0f} B/image; store "
          f"{result['disk_bytes_per_image']:,.0f} B/image on disk; peak RSS {resident / 2**30:.1f} GiB")
    gap, error = limits["gap_10_11"], limits["store_error_top10"]
    print(f"exact score gap between ranks 10 and 11: median {gap['median']:.2e}, p10 {gap['p10']:.2e}; the store's "
          f"score error on the exact top-10: sd {error['sd']:.2e}"
          + (f"; every image re-ranked from the store: R@10 {limits['store_recall@10']:.3f}, R@50 "
             f"{limits['store_recall@50']:.3f}" if "store_recall@10" in limits else ""))
    print(f"{'nprobe':>6} {'cands':>6} {'rerank':>6} {'R@10':>6} {'R@50':>6} {'tol@10':>6} {'tol@50':>6} "
          f"{'task10':>6} {'exact':>6} {'task50':>6} {'exact':>6} {'reranked':>8} {'cand p50':>9} {'cand p99':>9} "
          f"{'p50 ms':>7} {'p99 ms':>7}")
    for row in rows:
        extra = (f"{row['reranked_images_mean']:>8.0f} {row['candidates_p50_ms']:>9.2f} {row['candidates_p99_ms']:>9.2f}"
                 if "candidates_p50_ms" in row else f"{'':>8} {'':>9} {'':>9}")
        print(f"{row['nprobe']:>6} {row['candidates']:>6} {str(row['rerank'] or 'all'):>6} {row['recall@10']:>6.3f} "
              f"{row['recall@50']:>6.3f} {row['recall_tol@10']:>6.3f} {row['recall_tol@50']:>6.3f} "
              f"{row['task_recall@10']:>6.3f} {row['exact_task_recall@10']:>6.3f} {row['task_recall@50']:>6.3f} "
              f"{row['exact_task_recall@50']:>6.3f} {extra} {row['search_p50_ms']:>7.2f} {row['search_p99_ms']:>7.2f}")
    if served_figures and "error" in served_figures:
        print(f"endpoint failed: {served_figures['error']}")
    elif served_figures:
        one, many = served_figures["concurrency_1"], served_figures["concurrency_16"]
        print(f"endpoint (POST /search, top 50, setting {settings[0]}): concurrency 1 p50/p99 {one['p50_ms']:.1f} / "
              f"{one['p99_ms']:.1f} ms; concurrency 16 p50/p99 {many['p50_ms']:.1f} / {many['p99_ms']:.1f} ms, "
              f"{many['queries_per_s']:.1f} queries/s")
    print(f"written: {out}")


if __name__ == "__main__":
    main()
