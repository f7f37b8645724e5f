"""MLflow tracking of sweep trials through Ray Tune's own ``MLflowLoggerCallback`` (each trial a run: its sampled
parameters and every result it reports), in the sweep's store (``tracking.py``)."""

from __future__ import annotations

from pathlib import Path

from ray.air.integrations.mlflow import MLflowLoggerCallback

from detailfusion.library.config import TrackingConfig
from detailfusion.platform.tracking import TrackingError, ensure_experiment, metric_name, quiet, store_uri


class TrialLogger(MLflowLoggerCallback):
    """Ray Tune's MLflow logger with the stage's metric names made legal for MLflow (``R@1`` -> ``R_at_1``)."""

    def log_trial_result(self, iteration: int, trial, result: dict) -> None:
        super().log_trial_result(iteration, trial, {metric_name(k): v for k, v in result.items()})


def tune_callbacks(tracking: TrackingConfig, directory: str | Path) -> list:
    """[the trial logger] for a sweep writing to ``directory``'s store, or [] with tracking off."""
    if not tracking.enabled:
        return []
    from mlflow import MlflowClient

    uri = store_uri(tracking, directory)
    with quiet():
        try:
            ensure_experiment(MlflowClient(tracking_uri=uri), tracking, directory)
        except Exception as exc:  # noqa: BLE001  (MLflow raises many kinds; all mean the same here)
            raise TrackingError(f"MLflow tracking store {uri!r} cannot be used: {exc} (set tracking.uri, or "
                                "tracking.enabled=false)") from exc
    return [TrialLogger(tracking_uri=uri, experiment_name=tracking.experiment, save_artifact=False,
                        tags={"detailfusion.kind": "sweep-trial"})]
