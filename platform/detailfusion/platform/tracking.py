"""Experiment tracking with MLflow: one run per training stage and per evaluation (sweep trials go through Ray
Tune's ``MLflowLoggerCallback``: ``tune.py``'s ``TrialLogger``).

The store is ``TrackingConfig.uri``, else ``MLFLOW_TRACKING_URI``, else ``sqlite:///<directory>/mlflow.db`` with artifacts in
``<directory>/mlartifacts`` (a pipeline puts all its runs in one store under its workdir); ``mlflow ui
--backend-store-uri sqlite:///<directory>/mlflow.db`` shows them. A stage's run is opened before its workers start
(a wrong URI fails before any training) and filled from the files the stage writes anyway (``metrics.csv``,
``validation.csv``, the export): nothing is logged from the training loop, so tracking costs no step time.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from detailfusion.library.config import TrackingConfig, to_dict
from detailfusion.library.errors import ConfigError


class TrackingError(ConfigError, RuntimeError):
    """The tracking store cannot be used (bad URI, unreachable server, ...)."""


def store_uri(tracking: TrackingConfig, directory: str | Path) -> str:
    """``tracking.uri``, else MLflow's own ``MLFLOW_TRACKING_URI``, else a SQLite store in ``directory``."""
    return tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(directory).resolve() / 'mlflow.db'}"


@contextmanager
def quiet():
    """MLflow's own INFO lines (database creation) and SQLAlchemy's deprecation warnings stay out of the output."""
    import mlflow  # noqa: F401  (configures its loggers on first import: set the level after that)

    logger = logging.getLogger("mlflow")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            warnings.filterwarnings("ignore", module="sqlalchemy")
            yield
    finally:
        logger.setLevel(level)


def flat_params(config: Any) -> dict[str, str]:
    """A config as MLflow params: dotted keys, values as text (``train.lr`` -> "1e-05")."""
    out: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                walk(f"{prefix}.{key}" if prefix else key, item)
        else:
            out[prefix] = str(value)[:6000]

    walk("", to_dict(config))
    return out


def ensure_experiment(client, tracking: TrackingConfig, directory: str | Path) -> str:
    """The id of ``tracking.experiment`` in the client's store, created if new (in a SQLite store, its artifacts go
    to ``mlartifacts/`` beside the database file, not to the working directory)."""
    experiment = client.get_experiment_by_name(tracking.experiment)
    if experiment is not None:
        return experiment.experiment_id
    uri = store_uri(tracking, directory)
    location = None  # a server's store: the server decides
    if uri.startswith("sqlite:///"):  # a local database file: its artifacts beside it
        location = (Path(uri[len("sqlite:///"):]).resolve().parent / "mlartifacts").as_uri()
    return client.create_experiment(tracking.experiment, artifact_location=location)


def metric_name(key: str) -> str:
    """An MLflow-legal metric name: ``val/afc/R@1`` -> ``val/afc/R_at_1`` (MLflow refuses "@")."""
    return key.replace("@", "_at_")


class TrackedRun:
    """One MLflow run, written through ``MlflowClient`` (no process-global active run)."""

    def __init__(self, tracking: TrackingConfig, directory: str | Path, name: str, params: dict[str, str],
                 tags: dict[str, str] | None = None):
        with quiet():
            from mlflow import MlflowClient

            self.uri = store_uri(tracking, directory)
            try:
                self.client = MlflowClient(tracking_uri=self.uri)
                experiment_id = ensure_experiment(self.client, tracking, directory)
                run = self.client.create_run(experiment_id, run_name=name, tags=tags or {})
            except Exception as exc:  # noqa: BLE001  (MLflow raises many kinds; all mean the same here)
                raise TrackingError(f"MLflow tracking store {self.uri!r} cannot be used: {exc} (set tracking.uri, or "
                                    "tracking.enabled=false to run without tracking)") from exc
            self.run_id = run.info.run_id
            self.log_params(params)

    def log_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(key, value) for key, value in params.items()]
        with quiet():
            for start in range(0, len(items), 100):
                self.client.log_batch(self.run_id, params=items[start:start + 100])

    def log_metrics(self, rows: list[tuple[str, float, int, int]]) -> None:
        """rows: (key, value, step, timestamp ms); non-finite values are left out."""
        from mlflow.entities import Metric

        metrics = [Metric(metric_name(key), float(value), timestamp, step)
                   for key, value, step, timestamp in rows if math.isfinite(value)]
        with quiet():
            for start in range(0, len(metrics), 1000):
                self.client.log_batch(self.run_id, metrics=metrics[start:start + 1000])

    def log_csv(self, path: Path, step_column: str = "step", skip: tuple[str, ...] = ()) -> int:
        """Every numeric column of a CSV written by the job, per row at that row's ``step_column``; returns rows."""
        if not path.is_file():
            return 0
        with path.open() as f:
            rows = list(csv.DictReader(f))
        metrics = []
        for row in rows:
            step = int(float(row.get(step_column) or 0))
            stamp = int(float(row.get("wall_time") or time.time()) * 1000)
            for key, value in row.items():
                if key in (step_column, "wall_time", *skip):
                    continue
                try:
                    metrics.append((key, float(value), step, stamp))
                except (TypeError, ValueError):
                    continue
        self.log_metrics(metrics)
        return len(rows)

    def log_artifacts(self, directory: str | Path, artifact_path: str | None = None) -> None:
        with quiet():
            self.client.log_artifacts(self.run_id, str(directory), artifact_path)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        with quiet():
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def end(self, status: str = "FINISHED") -> None:
        with quiet():
            self.client.set_terminated(self.run_id, status)


def open_run(tracking: TrackingConfig, directory: str | Path, name: str, config: Any,
             tags: dict[str, str] | None = None) -> TrackedRun | None:
    """A new run holding ``config`` as params, or None with tracking off."""
    if not tracking.enabled:
        return None
    return TrackedRun(tracking, directory, name, flat_params(config), tags)
