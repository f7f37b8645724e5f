"""The shared shape of every script in ``jobs/``: ``--config FILE`` + ``--set key=value`` -> typed config -> one call."""

from __future__ import annotations

import argparse
import sys
from typing import Any, Callable

from .config import ConfigError, load_config


def run_job(config_class: type, entry: Callable[[Any], Any], description: str | None = None,
            argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML file of the job's config (keys of %s)" % config_class.__name__)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one key")
    args = parser.parse_args(argv)
    try:
        config = load_config(config_class, args.config, args.set)
        entry(config)
    except (ConfigError, ValueError, FileNotFoundError, RuntimeError) as exc:
        report_error(parser.prog, exc)
        return 2
    return 0


def report_error(prog: str, exc: BaseException) -> None:
    """A refusal - a missing file, or an error raised by one of our own checks (its innermost frame is in this
    package) - is one line; a ValueError / RuntimeError raised anywhere else (torch, Ray Train's failed run, a
    library: a bug or a failure, not a refusal) comes with its traceback, so nothing deep in a run is reduced to
    one line."""
    import traceback
    from pathlib import Path

    frames = traceback.extract_tb(exc.__traceback__)
    ours = bool(frames) and Path(frames[-1].filename).resolve().is_relative_to(Path(__file__).resolve().parent)
    if not ours and not isinstance(exc, FileNotFoundError):
        traceback.print_exception(exc, file=sys.stderr)
    print(f"{prog}: error: {exc}", file=sys.stderr)


def run_stage_job(stage: int, description: str | None = None, argv: list[str] | None = None) -> int:
    """A training-stage script: its config's train.stage must be ``stage`` (a stage-2 config given to the
    stage-1 script is refused before anything starts)."""
    from .config import JobConfig
    from .train.run import run_stage

    def entry(config: JobConfig) -> None:
        if config.train.stage != stage:
            raise ValueError(f"this is the stage {stage} job, but the config says train.stage={config.train.stage}")
        run_stage(config)

    return run_job(JobConfig, entry, description, argv)
