"""Exact top-k gallery search in torch against FAISS flat inner product, on the same vectors, in the same run.

The index holds Nq token vectors per image (METHOD.md: 32 x 512 for BLIP-2); an image scores max over its tokens.
The baseline is ``GalleryIndex.search`` (one einsum + max + stable sort); FAISS searches the flat token index
for ``k * Nq`` hits and keeps the first hit of each image (exact: ``GalleryIndex.search_faiss``). Prints the
top-k agreement (must be 100%) and the time ratio for a CIRR-sized gallery.

    python benchmarks/search.py [--images 2297] [--tokens 32] [--dim 512] [--queries 1000] [--k 50]
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch
from torch.nn import functional as F

from detailfusion.library.index.exact import GalleryIndex


def timed(fn, repeats: int = 3):
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2297, help="gallery size (CIRR val: 2297)")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--dim", type=int, default=512, help="unified width 2D")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--k", type=int, default=50)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import faiss

    faiss.omp_set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    embeddings = F.normalize(torch.randn(args.images, args.tokens, args.dim, generator=generator), dim=-1) / 2 ** 0.5
    queries = F.normalize(torch.randn(args.queries, args.dim, generator=generator), dim=-1)
    index = GalleryIndex(embeddings, [str(i) for i in range(args.images)], "benchmark")

    exact_s, (exact_scores, exact) = timed(lambda: index.search(queries, args.k))
    faiss_s, (faiss_scores, found) = timed(lambda: index.search_faiss(queries, args.k))
    same_sets = sum(set(a) == set(b) for a, b in zip(exact.tolist(), found.tolist())) / args.queries
    same_order = (exact == found).all(dim=1).float().mean().item()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, faiss {faiss.__version__}, "
          f"{args.threads} threads")
    print(f"gallery {args.images} images x {args.tokens} tokens x {args.dim}; {args.queries} queries; top-{args.k}")
    print(f"exact torch (baseline): {exact_s * 1e3:8.1f} ms  ({args.queries / exact_s:,.0f} queries/s)")
    print(f"faiss flat IP:          {faiss_s * 1e3:8.1f} ms  ({args.queries / faiss_s:,.0f} queries/s)")
    print(f"faiss / exact time ratio: {faiss_s / exact_s:.2f}x")
    print(f"top-{args.k} sets identical: {same_sets:.1%}; identical order: {same_order:.1%}; "
          f"max score difference {float((exact_scores - faiss_scores).abs().max()):.2e}")


if __name__ == "__main__":
    main()
