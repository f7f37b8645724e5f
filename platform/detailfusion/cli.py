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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"detailfusion {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
