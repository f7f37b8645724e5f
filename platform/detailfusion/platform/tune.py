"""Ray Tune sweeps over any training stage: a tune-space YAML -> Ray Tune's own search-space functions; each
trial is one full Ray Train run of the stage (``run_stage`` with Ray Tune's Train report callback), scored on
validation recall computed by the evaluation code (``val_score``: CIRR Avg / FashionIQ mean of the stage's
variant, see ``eval/validate.py``), never on the training loss.

Space file grammar (``tune_spaces/*.yaml``): a mapping of dotted job-config keys to one distribution each::

    loss.gamma: {grid: [0.5, 1.0, 2.0, 4.0]}   # every value, once per --num-samples
    optim.lr: {loguniform: [1.0e-6, 1.0e-4]}   # log-uniform between the bounds
    loss.hard_negative_scale: {uniform: [1.0, 4.0]}
    loss.subset_negatives: {choice: [0, 1, 2, 3]}

Output (``out/``): ``tune/`` (Ray Tune's experiment state), ``trials/<trial id>/stage<N>/`` (each trial's run),
``results.csv`` / ``results.md`` (one row per trial, best first), ``best_model/`` (the best finished trial's
export, ``save_pretrained`` format) and ``best.json``; ``mlflow.db`` (unless ``tracking.uri`` names another
store): one MLflow run per trial, logged by Ray Tune's ``MLflowLoggerCallback``. Rerunning the same command resumes an interrupted sweep
(``Tuner.restore``): finished trials are kept, unfinished ones continue from their last checkpoint.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import signal
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from detailfusion.library.config import ConfigError, JobConfig, from_dict, to_dict, with_value
from detailfusion.library.registry import extensions
from detailfusion.platform.train.stage_run import stage_dirs, stage_dirs_at

DISTRIBUTIONS = ("grid", "choice", "uniform", "loguniform")
SWEEP_OWNED = ("name", "workdir", "train.stage", "data.val_prepared", "train.validate_every", "train.checkpoint_every")
EXPERIMENT = "tune"


class SpaceError(ConfigError):
    """A tune-space file that cannot be turned into a search space."""


@dataclass(frozen=True)
class SweepSettings:
    """What the sweep does around the trials (the trials' own settings are the job config)."""

    stage: int
    space: str  # tune-space YAML
    out: str  # sweep directory
    num_samples: int = 1  # draws of the space (grid values are crossed with every draw)
    scheduler: str = "asha"  # asha (early stopping on the validation score) | fifo
    metric: str = "val_score"
    mode: str = "max"
    grace_period: int = 1  # ASHA: epochs every trial runs before it can be stopped
    reduction_factor: float = 2.0  # ASHA: keep the best 1/rf at each rung
    max_concurrent_trials: int = 1
    trial_cpus: float = 0.25  # the trial function's own CPU; its Train workers request theirs
    num_cpus: int | None = None  # of a local Ray started by the sweep


# -- space files ----------------------------------------------------------------------------------------


def load_space(path: str | Path, base: JobConfig) -> dict[str, tuple[str, list]]:
    """{dotted key: (distribution, arguments)}, every key and value checked against ``base``'s typed config."""
    where = str(path)
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise SpaceError(f"{where}: cannot read tune space ({exc.strerror})") from exc
    except yaml.YAMLError as exc:
        raise SpaceError(f"{where}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict) or not raw:
        raise SpaceError(f"{where}: expected a mapping of config keys to distributions, e.g. loss.gamma: {{grid: [1, 2]}}")
    space = {}
    for key, spec in raw.items():
        at = f"{where}: {key}"
        if key in SWEEP_OWNED:
            raise SpaceError(f"{at}: the sweep sets this key itself; it cannot be searched")
        if not isinstance(spec, dict) or len(spec) != 1:
            raise SpaceError(f"{at}: expected one distribution, e.g. {{grid: [...]}}; known: {', '.join(DISTRIBUTIONS)}")
        (name, args), = spec.items()
        if name not in DISTRIBUTIONS:
            raise SpaceError(f"{at}: unknown distribution {name!r}; known: {', '.join(DISTRIBUTIONS)}")
        if not isinstance(args, list) or not args:
            raise SpaceError(f"{at}: {name} takes a non-empty list, got {args!r}")
        if name in ("uniform", "loguniform"):
            if len(args) != 2 or not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args):
                raise SpaceError(f"{at}: {name} takes [low, high] numbers, got {args!r}")
            low, high = (float(a) for a in args)
            if not low < high:
                raise SpaceError(f"{at}: {name} bounds must have low < high, got {args!r}")
            if name == "loguniform" and low <= 0:
                raise SpaceError(f"{at}: loguniform bounds must be > 0, got {args!r}")
            args = [low, high]
        for value in args:  # every value the space can produce must be a valid config value
            try:
                with_value(base, key, value, source=at)
            except ConfigError as exc:
                raise SpaceError(str(exc)) from None
        space[key] = (name, args)
    return space


def param_space(space: dict[str, tuple[str, list]]) -> dict[str, Any]:
    """Ray Tune's search-space objects for a loaded space."""
    from ray import tune

    make = {"grid": tune.grid_search, "choice": tune.choice,
            "uniform": lambda a: tune.uniform(*a), "loguniform": lambda a: tune.loguniform(*a)}
    return {key: make[name](args) for key, (name, args) in space.items()}


def trial_config(base: JobConfig, params: dict[str, Any], workdir: str, val_prepared: str) -> JobConfig:
    """The job config of one trial: the sampled values over ``base``, its own workdir, validated every epoch."""
    config = base
    for key, value in params.items():
        config = with_value(config, key, value, source=f"trial parameter {key}")
    return replace(config, workdir=workdir, data=replace(config.data, val_prepared=val_prepared),
                   train=replace(config.train, validate_every=1, checkpoint_every=0),
                   tracking=replace(config.tracking, enabled=False))  # Tune's MLflow callback tracks the trials


# -- the trial --------------------------------------------------------------------------------------------


def run_trial(params: dict[str, Any], base: dict, val_prepared: str, trials_dir: str,
              shipped: list | None = None) -> None:
    """Ray Tune function trainable: one full Ray Train run of the stage in ``trials_dir/<trial id>``; ``shipped``:
    the driver's registry extensions (``library/registry.py``), installed before the config names them."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from detailfusion.library.registry import install
    from detailfusion.platform.train.run import run_stage

    install(shipped)
    config = trial_config(from_dict(JobConfig, base, source="sweep base config"), params,
                          workdir=str(Path(trials_dir) / ray.tune.get_context().get_trial_id()),
                          val_prepared=val_prepared)
    done = stage_dirs(config)[0] / "DONE"
    if done.is_file():  # finished before an interruption that Tune did not record: report, do not retrain
        ray.tune.report(json.loads(done.read_text())["metrics"])
        return
    run_stage(config, callbacks=[TuneReportCallback()])


# -- the sweep --------------------------------------------------------------------------------------------


def check_settings(base: JobConfig, settings: SweepSettings) -> dict[str, tuple[str, list]]:
    """The sweep's space (``load_space``) once the settings agree with the stage config; nothing touches data."""
    if base.train.stage != settings.stage:
        raise ConfigError(f"--stage {settings.stage} but the config says train.stage={base.train.stage}")
    if not base.data.val_prepared:
        raise ConfigError("a sweep scores trials on validation recall: set data.val_prepared to a prepared labelled "
                          "CIRR or FashionIQ split (e.g. the output of `detailfusion prepare --split val`)")
    if settings.scheduler not in ("asha", "fifo"):
        raise ConfigError(f"--scheduler must be asha or fifo, got {settings.scheduler!r}")
    if settings.mode not in ("max", "min"):
        raise ConfigError(f"--mode must be max or min, got {settings.mode!r}")
    return load_space(settings.space, base)


def sweep(base: JobConfig, settings: SweepSettings) -> list[dict]:
    """Run (or resume) the sweep; returns the results rows, best first, and writes the table and best model."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from detailfusion.platform.ray_setup import init_ray
    from detailfusion.platform.train.run import absolute_paths, check_stage
    from detailfusion.platform.tune_tracking import tune_callbacks

    base = absolute_paths(base)
    space = check_settings(base, settings)
    check_stage(trial_config(base, {k: args[0] for k, (_, args) in space.items()}, base.workdir, base.data.val_prepared))
    out = Path(settings.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    init_ray(settings.num_cpus, dashboard=True)  # Train frees a stopped trial's resources through its state API

    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base=to_dict(base), val_prepared=base.data.val_prepared,
                             trials_dir=str(out / "trials"), shipped=extensions()),
        {"cpu": settings.trial_cpus},
    )
    experiment = out / EXPERIMENT
    if tune.Tuner.can_restore(str(experiment)):
        print(f"[sweep] resuming {experiment}: finished trials are kept, unfinished ones continue", flush=True)
        tuner = tune.Tuner.restore(str(experiment), trainable=trainable, resume_unfinished=True, resume_errored=False)
    else:
        scheduler = (ASHAScheduler(time_attr="training_iteration", max_t=base.train.epochs,
                                   grace_period=settings.grace_period, reduction_factor=settings.reduction_factor,
                                   stop_last_trials=False)  # a trial at its last epoch ends itself (export, DONE)
                     if settings.scheduler == "asha" else FIFOScheduler())
        tuner = tune.Tuner(
            trainable,
            param_space=param_space(space),
            tune_config=tune.TuneConfig(metric=settings.metric, mode=settings.mode, scheduler=scheduler,
                                        num_samples=settings.num_samples,
                                        max_concurrent_trials=settings.max_concurrent_trials,
                                        trial_dirname_creator=lambda trial: trial.trial_id),
            run_config=tune.RunConfig(name=EXPERIMENT, storage_path=str(out),
                                      failure_config=tune.FailureConfig(max_failures=0, fail_fast=False),
                                      callbacks=tune_callbacks(base.tracking, out)),
        )
        (out / "sweep.json").write_text(json.dumps({"stage": settings.stage, "space": {k: {d: a} for k, (d, a) in space.items()},
                                                     "base_config": to_dict(base), "settings": to_dict(settings)},
                                                    indent=1))
    print(f"[sweep] stage {settings.stage}, space {settings.space} ({', '.join(space)}), scheduler {settings.scheduler}, "
          f"scored on {settings.metric} ({settings.mode}) -> {out}", flush=True)
    grid, interrupted = fit_noting_interrupts(tuner)
    if interrupted:  # Tune stopped the trials (their actors and placement groups) and saved the experiment's state
        raise KeyboardInterrupt(f"sweep interrupted; rerun the same command to resume {experiment}")
    rows = results_rows(grid, list(space), settings, base.train.epochs, out / "trials")
    write_results(rows, list(space), settings, out)
    return rows


def fit_noting_interrupts(tuner) -> tuple[Any, bool]:
    """``tuner.fit()`` and whether Ctrl-C (or SIGTERM, which ``ray_setup`` turns into it) ended it. Tune's SIGINT
    handler ends the run cleanly, trials resumable, and returns as if it had finished; when it handles a signal it
    puts back the handler it found, which is how the interruption shows here."""
    if threading.current_thread() is not threading.main_thread() or os.environ.get("TUNE_DISABLE_SIGINT_HANDLER") == "1":
        return tuner.fit(), False  # no handler of Tune's: Ctrl-C raises KeyboardInterrupt through fit()
    previous = signal.getsignal(signal.SIGINT)

    def found(signum, frame):  # what Tune finds, and puts back after a signal
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, found)
    try:
        grid = tuner.fit()
        return grid, signal.getsignal(signal.SIGINT) is found
    finally:
        signal.signal(signal.SIGINT, previous)


def results_rows(grid, keys: list[str], settings: SweepSettings, epochs: int, trials_dir: Path) -> list[dict]:
    """One row per trial: id, status, epochs run, early stop, parameters, final and best score, export, error."""
    rows = []
    for result in grid:
        history = result.metrics_dataframe
        scores = history[settings.metric].dropna().tolist() if history is not None and settings.metric in history else []
        iterations = int((result.metrics or {}).get("training_iteration", 0))
        trial = Path(result.path).name  # the trial id (trial_dirname_creator)
        stage_dir, export = stage_dirs_at(trials_dir / trial, settings.stage)
        # the last epoch's report comes after the export; ASHA may stop a trial right at that report (its top rung)
        finished = (export / "config.json").is_file() and ((stage_dir / "DONE").is_file() or iterations >= epochs)
        status = "ERROR" if result.error else ("FINISHED" if finished else "STOPPED")
        rows.append({
            "trial": trial, "status": status, "epochs": iterations,
            "early_stopped": status == "STOPPED" and iterations < epochs,
            **{key: (result.config or {}).get(key) for key in keys},
            settings.metric: scores[-1] if scores else None,
            f"best_{settings.metric}": (max(scores) if settings.mode == "max" else min(scores)) if scores else None,
            "export": str(export) if finished else "",
            "error": str(result.error).strip().splitlines()[-1][:200] if result.error else "",
        })
    sign = -1 if settings.mode == "max" else 1
    rows.sort(key=lambda r: (r["status"] != "FINISHED", r[settings.metric] is None,
                             sign * (r[settings.metric] if r[settings.metric] is not None else 0.0)))
    return rows


def write_results(rows: list[dict], keys: list[str], settings: SweepSettings, out: Path) -> None:
    """results.csv, results.md (best first), best_model/ + best.json of the best finished trial."""
    with (out / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["trial"])
        writer.writeheader()
        writer.writerows(rows)
    show = lambda v: f"{v:.4g}" if isinstance(v, float) and math.isfinite(v) else ("" if v is None else str(v))  # noqa: E731
    columns = ["trial", "status", "epochs", *keys, settings.metric, f"best_{settings.metric}", "error"]
    lines = [f"# Sweep of stage {settings.stage}: {settings.space}", "",
             f"Scored on `{settings.metric}` ({settings.mode}), validation recall after each epoch; "
             f"scheduler {settings.scheduler}. Best first; STOPPED = stopped early by the scheduler.", "",
             "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(show(row[c]) for c in columns) + " |" for row in rows]
    best = next((r for r in rows if r["status"] == "FINISHED" and r[settings.metric] is not None), None)
    if best is not None:
        target = out / "best_model"
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(best["export"], target)
        (out / "best.json").write_text(json.dumps({**best, "best_model": str(target)}, indent=1, default=str))
        lines += ["", f"Best: trial `{best['trial']}`, {settings.metric} {show(best[settings.metric])}, "
                      f"exported to `{target}`."]
    else:
        lines += ["", "No trial finished: there is no best model."]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[4:]), flush=True)
