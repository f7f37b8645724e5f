"""Catalogue-scale retrieval: the compressed index (``CompressedIndex``: FAISS IVF-PQ candidates over the token
vectors, exact re-ranking from a float16 memory-mapped store) against exact search, on a synthetic gallery with
structure, in one run.

The gallery, per branch (gm, di) independently, in D dims: ``--concepts`` unit "concept" directions, drawn at
random. Each image takes ``--concepts-per-image`` of them, one image offset (a random Gaussian vector of norm about
``--image-noise``, shared by its tokens) and, per token, one of its concepts plus token noise (norm about
``--token-noise``); each token is L2-normalised per branch and the unified tokens ``[t_gm ; t_di] / sqrt 2`` are
written in chunks to a float16 .npy ([N, Nq, 2D], memory-mapped; 1M x 32 x 512 is 32 GiB). A query aims at a
random image: per branch the mean of that image's concepts plus noise (``--query-noise``), normalised, blended with
weights ``(a, 1 - a)``, a uniform in [0.2, 0.8], by the fusion rule (``model/fusion.py``'s ``fused_query``).

A query scores the same for every image holding one of its concepts (a max over tokens counts one), so the exact
top-50 is decided by the noise among hundreds of near ties per concept (N = 20,000: about 600 images per branch):
a hard case for approximate search, whose recall needs hits in proportion to N.

The exact reference is ``exact_search`` over the index's float16 store, read in chunks (the values the index
re-ranks). Reported, for each ``nprobe:candidates[:rerank]`` setting: recall@10 and recall@50 (the share of the
exact top-10 / top-50 in the index's top-10 / top-50, all queries), the latency of one query at a time (top-50;
p50, p99 over ``--latency-queries``; the candidate stage alone and the whole search), the mean number of images
re-ranked, plus build time, RAM bytes per image (the FAISS indexes) and disk bytes per image (the re-ranking
store). Printed as a table and written as JSON (``--out``).

    python benchmarks/catalogue.py --images 20000 [--queries 1000] [--dim 256] [--tokens 32]
        [--settings 64:8192:512 64:2048] [--m 32] [--nlist N] [--train-sample 262144] [--workdir DIR] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from detailfusion.compressed_index import CompressedIndex, CompressedIndexConfig, exact_search
from detailfusion.model.fusion import fused_query

CHUNK = 1024  # images generated (and exactly scored) at a time


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

    def queries(self, rule: str) -> torch.Tensor:
        """Unified queries [Q, 2D], each near a random image's concepts."""
        args = self.args
        rng = np.random.default_rng(args.seed + 1)
        targets = rng.integers(args.images, size=args.queries)
        branches = [F.normalize(directions[torch.from_numpy(chosen[targets])].mean(dim=1)
                                + gaussian(rng, (args.queries, args.dim), args.query_noise), dim=-1)
                    for directions, chosen in zip(self.directions, self.chosen)]
        a = torch.from_numpy(rng.uniform(0.2, 0.8, size=(args.queries, 1)).astype(np.float32))
        return fused_query(*branches, torch.cat([a, 1 - a], dim=1), rule)


def gaussian(rng, shape: tuple, norm: float) -> torch.Tensor:
    """Random Gaussian vectors along the last axis with norms about ``norm``."""
    return torch.from_numpy(rng.standard_normal(shape, dtype=np.float32)) * (norm / math.sqrt(shape[-1]))


def write_gallery(concepts: Concepts, path: Path) -> np.ndarray:
    args = concepts.args
    gallery = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16,
                                        shape=(args.images, args.tokens, 2 * args.dim))
    for start in range(0, args.images, CHUNK):
        rows = slice(start, min(start + CHUNK, args.images))
        gallery[rows] = concepts.tokens(rows, seed=args.seed + 2 + start // CHUNK).numpy()
    gallery.flush()
    return np.load(path, mmap_mode="r")


def recall(found: torch.Tensor, exact: torch.Tensor) -> float:
    """The share of each query's exact list [Q, k] that ``found`` [Q, k] holds, averaged over queries."""
    return sum(len(set(a) & set(b)) for a, b in zip(found.tolist(), exact.tolist())) / exact.numel()


def latencies(fn, queries: torch.Tensor) -> dict:
    """p50 / p99 milliseconds of ``fn`` on one query at a time."""
    times = []
    for q in queries.split(1):
        start = time.perf_counter()
        fn(q)
        times.append(time.perf_counter() - start)
    return {"p50_ms": float(np.percentile(times, 50)) * 1e3, "p99_ms": float(np.percentile(times, 99)) * 1e3}


def measure(index: CompressedIndex, queries: torch.Tensor, exact: torch.Tensor, setting: dict, timed: int) -> dict:
    """Recall of the top-50 (all queries) and one-query latencies (the first ``timed``) at one search setting."""
    nprobe, candidates, rerank = setting["nprobe"], setting["candidates"], setting["rerank"]
    keep = max(rerank, 50) if rerank else None
    found = index.search(queries, 50, **setting)[1]
    images = [len(c) for c in index.candidates(queries, candidates, nprobe, keep)]
    stage = latencies(lambda q: index.candidates(q, candidates, nprobe, keep), queries[:timed])
    whole = latencies(lambda q: index.search(q, 50, **setting), queries[:timed])
    return {**setting, "recall@10": recall(found[:, :10], exact[:, :10]),
            "recall@50": recall(found, exact), "reranked_images_mean": float(np.mean(images)),
            "candidates_p50_ms": stage["p50_ms"], "candidates_p99_ms": stage["p99_ms"],
            "search_p50_ms": whole["p50_ms"], "search_p99_ms": whole["p99_ms"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, required=True, help="gallery size N")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--latency-queries", type=int, default=200, help="queries timed one at a time")
    parser.add_argument("--dim", type=int, default=256, help="branch width D (unified width 2D)")
    parser.add_argument("--tokens", type=int, default=32, help="tokens per image Nq")
    parser.add_argument("--rule", default="branch_max", choices=["branch_max", "joint_max"])
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
    parser.add_argument("--settings", nargs="+", default=["64:8192:512", "64:2048"],
                        help="nprobe:candidates[:rerank] to measure (rerank: images re-ranked, at least 50; 0: all)")
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
        start = time.perf_counter()
        concepts = Concepts(args)
        gallery = write_gallery(concepts, workdir / "gallery.npy")
        generate_s = time.perf_counter() - start

        config = CompressedIndexConfig(nlist=args.nlist, m=args.m, nbits=args.nbits, train_sample=args.train_sample,
                                       seed=args.seed)
        start = time.perf_counter()
        index = CompressedIndex.build(gallery, [str(n) for n in range(args.images)], "benchmark", workdir / "index",
                                      config, fusion_score=args.rule)
        build_s = time.perf_counter() - start

        queries = concepts.queries(args.rule)
        start = time.perf_counter()
        exact = exact_search(index.store, queries, 50, args.rule, chunk=CHUNK)[1]
        exact_s = time.perf_counter() - start
        rows = [measure(index, queries, exact, setting, args.latency_queries) for setting in settings]
        ram, disk = index.memory_bytes(), index.store_bytes()
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
        "config": asdict(index.config),
        "generate_s": generate_s, "build_s": build_s, "exact_reference_s": exact_s,
        "ram_bytes_per_image": ram / args.images, "disk_bytes_per_image": disk / args.images,
        "settings": rows,
    }
    out.write_text(json.dumps(result, indent=1))
    print(result["machine"])
    print(f"gallery {args.images:,} images x {args.tokens} tokens x 2 x {args.dim} ({args.rule}); {args.queries} "
          f"queries; nlist {index.config.nlist}, m {args.m}, nbits {args.nbits}")
    print(f"build {build_s:.1f} s (generate {generate_s:.1f} s, exact reference {exact_s:.1f} s); "
          f"RAM {result['ram_bytes_per_image']:,.0f} B/image; disk {result['disk_bytes_per_image']:,.0f} B/image")
    print(f"{'nprobe':>6} {'cands':>6} {'rerank':>6} {'R@10':>6} {'R@50':>6} {'reranked':>8} {'cand p50':>9} "
          f"{'cand p99':>9} {'p50 ms':>7} {'p99 ms':>7}")
    for row in rows:
        print(f"{row['nprobe']:>6} {row['candidates']:>6} {str(row['rerank'] or 'all'):>6} {row['recall@10']:>6.3f} "
              f"{row['recall@50']:>6.3f} "
              f"{row['reranked_images_mean']:>8.0f} {row['candidates_p50_ms']:>9.2f} {row['candidates_p99_ms']:>9.2f} "
              f"{row['search_p50_ms']:>7.2f} {row['search_p99_ms']:>7.2f}")
    print(f"written: {out}")


if __name__ == "__main__":
    main()
