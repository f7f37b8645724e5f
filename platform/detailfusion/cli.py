"""The ``detailfusion`` console script: one subcommand per job; each parses its arguments and makes one call."""

from __future__ import annotations

import argparse
import sys
import time


def _synth(args: argparse.Namespace) -> int:
    from .data.synthetic import write_synthetic

    start = time.perf_counter()
    print(f"writing synthetic {args.kind} ({args.pairs} pairs, seed {args.seed}) to {args.out} ...", flush=True)
    summary = write_synthetic(args.kind, args.out, pairs=args.pairs, seed=args.seed, image_size=args.image_size)
    counts = ", ".join(f"{split}: {n}" for split, n in summary.items())
    print(f"done in {time.perf_counter() - start:.1f} s -> {counts}")
    return 0


def _prepare(args: argparse.Namespace) -> int:
    from .config import PrepareConfig, from_dict, apply_override
    from .data.prepare import prepare

    fields = {k: v for k, v in vars(args).items() if k in PrepareConfig.__dataclass_fields__ and v is not None}
    if "categories" in fields:
        fields["categories"] = tuple(fields["categories"])
    config = from_dict(PrepareConfig, fields, source="detailfusion prepare")
    for item in args.set or []:
        config = apply_override(config, item)
    prepare(config)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="detailfusion", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    synth = commands.add_parser(
        "synth", help="write a procedural CIR dataset in the on-disk format of CIRR, FashionIQ or IPr2Pr"
    )
    synth.add_argument("--kind", required=True, choices=["cirr", "fashioniq", "ipr2pr"])
    synth.add_argument("--out", required=True, help="output directory (the dataset root)")
    synth.add_argument("--pairs", type=int, default=2000, help="total pairs over all splits (default 2000)")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--image-size", type=int, default=128, help="rendered image side in pixels (default 128)")
    synth.set_defaults(run=_synth)

    prep = commands.add_parser(
        "prepare", help="read, validate, decode and transform a dataset split into canonical parquet shards (Ray Data)"
    )
    prep.add_argument("--dataset", required=True, choices=["cirr", "fashioniq", "ipr2pr"])
    prep.add_argument("--root", required=True, help="dataset root in its original on-disk layout")
    prep.add_argument("--split", required=True, help="cirr: train|val|test1; fashioniq: train|val|test; ipr2pr: train")
    prep.add_argument("--out", required=True, help="output directory (shards, gallery, quarantine, manifest)")
    prep.add_argument("--preset", help="model preset whose image resolution to use (default tiny)")
    prep.add_argument("--image-size", type=int, help="override the preset's resolution (pixels)")
    prep.add_argument("--categories", nargs="+", help="FashionIQ categories (default: dress shirt toptee)")
    prep.add_argument("--max-bad-fraction", type=float, help="fail above this share of quarantined records (0.01)")
    prep.add_argument("--batch-size", type=int, help="images per Ray Data batch (64)")
    prep.add_argument("--cache-vision-features", action="store_true", default=None,
                      help="also encode every image once with the frozen ViT and store the token features")
    prep.add_argument("--model", help="model dir or preset for the feature cache (default: --preset)")
    prep.add_argument("--encoder-actors", type=int, help="actor-pool size of the feature-cache encoder (1)")
    prep.add_argument("--use-gpu", action="store_true", default=None, help="one GPU per encoder actor")
    prep.add_argument("--num-cpus", type=int, help="CPUs of a local Ray (ignored under ray job submit)")
    prep.add_argument("--set", action="append", metavar="KEY=VALUE", help="any PrepareConfig field")
    prep.set_defaults(run=_prepare)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"detailfusion {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
