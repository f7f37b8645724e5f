"""How hard the synthetic CIRR layouts are without a trained model: the near-duplicate layout, the detail benchmark
v1 and v2, in the same run, on test1 with its hidden targets. v2 also gets its shortcut report per edit family and
direction (random, pixel NN, text only, late fusion, oracle: detailfusion.library.data.shortcut_report).

Writes both layouts (timing each), then scores test1 with the image-only pixel baseline (cosine of mean-centred
``--side`` x ``--side`` RGB, reference removed), random scores and the caption + ground-truth-scene oracle
(detailfusion.library.data.synthetic_difficulty); prints R@1/5/10/50 over the split's images and Rs@1/2/3 in img_set.

    python benchmarks/synthetic_difficulty.py [--test-pairs 2000] [--val-pairs 500] [--train-pairs 1600]
        [--old-pairs 20000] [--image-size 128] [--side 16] [--seed 0] [--out DIR]
        [--v2-test-pairs 4000] [--v2-train-pairs 10000]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from detailfusion.library.data.shortcut_report import shortcut_report, shortcut_table
from detailfusion.library.data.synthetic import write_synthetic
from detailfusion.library.data.synthetic_difficulty import RECALL_AT, SUBSET_RECALL_AT, difficulty, load_queries


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--test-pairs", type=int, default=2000, help="detail benchmark test1 queries")
    parser.add_argument("--val-pairs", type=int, default=500, help="detail benchmark val queries")
    parser.add_argument("--train-pairs", type=int, default=1600, help="detail benchmark train queries")
    parser.add_argument("--old-pairs", type=int, nargs="+", default=[2000, 20000],
                        help="near-duplicate layout sizes (pairs over all splits; test1 gets 10 %%)")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--side", type=int, default=16, help="pixel baseline's downsampled side")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="directory for the datasets (default: a temporary one)")
    parser.add_argument("--v2-test-pairs", type=int, default=4000, help="benchmark v2 test1 queries")
    parser.add_argument("--v2-train-pairs", type=int, default=10000, help="benchmark v2 train queries (timing)")
    args = parser.parse_args()

    out = Path(args.out or tempfile.mkdtemp(prefix="synthetic-difficulty-"))
    layouts = {f"near-duplicates {n}": dict(pairs=n) for n in args.old_pairs}
    layouts["detail"] = dict(pairs=args.train_pairs, benchmark="detail", val_pairs=args.val_pairs,
                             test_pairs=args.test_pairs)
    columns = [f"R@{k}" for k in RECALL_AT] + [f"Rs@{k}" for k in SUBSET_RECALL_AT]
    rows = []
    layouts["detail v2"] = dict(kind="detail", pairs=args.v2_train_pairs, test_pairs=args.v2_test_pairs)
    for name, options in layouts.items():
        root = out / name.replace(" ", "-")
        kind = options.pop("kind", "cirr")
        start = time.perf_counter()
        size = None if kind == "detail" else args.image_size  # v2 draws the tiny preset's 64 px
        summary = write_synthetic(kind, root, seed=args.seed, image_size=size, **options)
        seconds = time.perf_counter() - start
        queries = load_queries(root, "test1")
        images = sum(len(load_queries(root, s).gallery) for s in ("train", "val", "test1"))
        print(f"{name}: {images} images, {sum(summary.values())} pairs written in {seconds:.1f} s "
              f"({size or 64} px); test1 {len(queries.reference)} queries over {len(queries.gallery)} images")
        if kind == "detail":
            report = shortcut_report(root, "test1", args.side, args.seed)
            print(f"\nshortcut report, {name} test1, by edit family / direction:\n{shortcut_table(report)}\n")
            for scorer in ("random", "pixel_nn", "oracle"):
                rows.append((name, len(queries.reference), len(queries.gallery), scorer, report[scorer]["all"]))
            continue
        for scorer, metrics in difficulty(root, "test1", args.side, args.seed).items():
            rows.append((name, len(queries.reference), len(queries.gallery), scorer, metrics))
    print(f"\n| layout | queries | gallery | scorer | {' | '.join(columns)} |")
    print("|---|---:|---:|---|" + "---:|" * len(columns))
    for name, n_queries, n_gallery, scorer, metrics in rows:
        print(f"| {name} | {n_queries} | {n_gallery} | {scorer} | " + " | ".join(f"{metrics[c]:.1f}" for c in columns) + " |")


if __name__ == "__main__":
    main()
