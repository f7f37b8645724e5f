"""Where a stage's files live (from its config alone) and ``StageRun``, what the driver resolved for one run that the
workers need beyond the config. Both the driver (``run.py``) and the workers (``loop.py``) read paths from here, so
a path travels in one channel: the config."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from detailfusion.library.config import JobConfig


def stage_dir(workdir: str | Path, stage: int) -> Path:
    """``workdir/stage<N>``: metrics.csv, config.yaml, workers.json, DONE, Ray Train's storage."""
    return Path(workdir) / f"stage{stage}"


def export_dir(workdir: str | Path, stage: int) -> Path:
    """Stage ``stage``'s ``save_pretrained`` export in ``workdir``: the one place the layout is named."""
    return stage_dir(workdir, stage) / "model"


def stage_dirs_at(workdir: str | Path, stage: int) -> tuple[Path, Path]:
    """(stage_dir, export_dir) of stage ``stage`` in ``workdir``."""
    return stage_dir(workdir, stage), export_dir(workdir, stage)


def stage_dirs(config: JobConfig) -> tuple[Path, Path]:
    """(stage_dir, export_dir) of a stage's config."""
    return stage_dirs_at(config.workdir, config.train.stage)


@dataclass(frozen=True)
class StageRun:
    """The driver's facts for one run of a stage (picklable: it travels in Train's loop config).

    ``weights_from``: the export every rank loads, which is not always ``model.init_from``: the tiny preset's random
    start and a stage that adds a fresh compositor write it into ``stage<N>/init``. ``rows``: rows of one epoch
    (whole global batches where the driver planned them). ``called_at``: ``time.time()`` when the stage was called
    (the workers' start-up line). ``held``: the split's input in the object store (``GalleryInput``), or None when
    Ray Data streams it (the trainer's "train" dataset). ``data_epochs``: epochs in the held input's plan (1: one
    epoch, which the loop re-deals or re-reads per epoch).
    """

    weights_from: str
    rows: int
    called_at: float
    held: Any = None  # data.training_input.GalleryInput
    data_epochs: int = 1
