"""Driver of one training stage: check everything that can be checked before a worker starts, then run the
recipe (``loop.py``) on a Ray Train ``TorchTrainer`` and return where the exported model is.

Run directory (``workdir/stage<N>``): ``model/`` the export (save_pretrained), ``metrics.csv``, ``config.yaml``
(the resolved config), ``init/`` (tiny preset only: the random initial model every rank starts from), and
Ray Train's storage (``ray/<name>``: DeepSpeed checkpoints, best ``keep_checkpoints`` by loss).
Rerunning the same command resumes from the latest checkpoint; a finished stage is reused.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import threading
import time
from dataclasses import replace
from pathlib import Path

from detailfusion.library.config import JobConfig, save_config, to_dict
from detailfusion.library.data.manifest import Manifest, read_manifest
from detailfusion.library.datasets import DATASETS
from detailfusion.library.errors import StageError  # re-exported: callers import it from here
from detailfusion.library.registry import extensions
from detailfusion.platform.data.training_input import gallery_input, inline_bytes, inline_input, training_dataset
from detailfusion.platform.train.engine import clipping
from detailfusion.platform.train.model_card import write_model_card
from detailfusion.platform.train.stage_run import StageRun, export_dir, stage_dirs
from detailfusion.platform.train.stages import stage_spec

HEALTH_CHECK_INTERVAL_S = 0.5  # Ray Train's worker poll interval (set RAY_TRAIN_HEALTH_CHECK_INTERVAL_S to change)


def check_stage(config: JobConfig) -> dict:
    """Validate the config against the data and the previous stage; returns the prepared split's manifest."""
    spec = stage_spec(config.train)
    if not config.data.prepared:
        raise StageError("data.prepared is not set: point it at the output of `detailfusion prepare`")
    manifest = read_manifest(config.data.prepared)
    if manifest.layout != spec.layout:
        names = [n for n in DATASETS.names() if DATASETS.get(n).layout == spec.layout]
        raise StageError(
            f"stage {spec.number} ({spec.name}) trains on {spec.layout}-layout datasets ({', '.join(names)}), but "
            f"{config.data.prepared} holds {manifest.dataset} ({manifest.layout} layout)"
        )
    if config.data.dataset not in (None, manifest.dataset):
        raise StageError(f"data.dataset={config.data.dataset!r} but {config.data.prepared} holds {manifest.dataset}")
    if spec.batches == "captions":
        check_captions(config.data.prepared)
    if spec.starts_from != "preset":
        init = config.model.init_from
        if not init or not (Path(init) / "config.json").is_file():
            raise StageError(
                f"stage {spec.number} starts from the stage {spec.number - 1} export: set model.init_from to its "
                f"model directory (got {init!r}, which holds no exported model)"
            )
    elif config.model.init_from and not (Path(config.model.init_from) / "config.json").is_file():
        raise StageError(f"model.init_from={config.model.init_from!r} holds no exported model (no config.json)")
    if config.loss.subset_negatives and manifest.layout != "gallery":
        raise StageError(f"loss.subset_negatives needs near-duplicate sets (CIRR img_set); {manifest.dataset} has "
                         "none: set it to 0")
    if config.loss.gallery_negatives < 0 or (config.loss.gallery_negatives and spec.batches != "branch_outputs"):
        raise StageError(f"loss.gallery_negatives={config.loss.gallery_negatives}: a bank of the cached training "
                         f"gallery for stage 3's L_C (an objective on cached branch outputs); stage {spec.number}'s "
                         f"objective {spec.objective!r} has none: set it to 0")
    if not 0 <= config.data.holdout_fraction < 1:
        raise StageError(f"data.holdout_fraction must be in [0, 1), got {config.data.holdout_fraction}")
    if config.data.val_prepared:
        check_validation(config, manifest)
    check_optimisation(config)
    return manifest


def check_optimisation(config: JobConfig) -> None:
    """Precision, clipping and compositor settings that cannot work together."""
    from detailfusion.platform.train.engine import clips_with_torch

    train, optim = config.train, config.optim
    if train.zero_stage == 3:  # found by the ZeRO-3 test: parameters read outside forward are empty partitions
        raise StageError("train.zero_stage=3 is not supported yet: the stage losses read branch parameters outside "
                         "the model's forward (temperatures, L_DI's subset negatives, stage 0's and stage 3's "
                         "encoders), where ZeRO-3 leaves them partitioned (empty); use zero_stage 2 (sharded "
                         "optimizer state and gradients)")
    if not train.use_gpu and train.precision == "fp16":
        raise StageError("train.precision=fp16 needs GPUs; use fp32 (or bf16) on CPU")
    if train.precision == "fp16" and train.zero_stage > 0:
        raise StageError(f"train.precision=fp16 with ZeRO-{train.zero_stage}: autocast over fp32 weights has no loss "
                         "scaler there; use bf16, or zero_stage 0")
    branches_trained = sum(part.endswith("_branch") for part in stage_spec(train).trainable)
    if branches_trained > 1 and optim.clip == "per_branch" and optim.grad_clip > 0 and not clips_with_torch(train):
        raise StageError(f"optim.clip=per_branch (GM and DI clipped apart) needs train.zero_stage=0 and fp32/bf16, got "
                         f"ZeRO-{train.zero_stage} {train.precision}: DeepSpeed's own clipping takes one global norm; "
                         "set optim.clip=global (or auto) to use it")


def check_captions(prepared: str) -> None:
    """Stage 0 trains on the images' captions: every row of the prepared IPr2Pr split must have both."""
    import pyarrow.parquet as pq

    folder = Path(prepared) / "triplets"
    names = pq.read_schema(next(folder.glob("*.parquet"))).names
    if "reference_caption" not in names:
        raise StageError(f"{prepared} holds no image captions (prepared before schema 3): run `detailfusion prepare` "
                         "on the split again")
    table = pq.read_table(folder, columns=["reference_caption", "target_caption"])
    missing = table.column("reference_caption").null_count + table.column("target_caption").null_count
    if missing:
        raise StageError(f"{prepared}: {missing} image captions are missing (the shards' original_prompt / "
                         "edited_prompt); stage 0 needs a caption for every image")


def check_validation(config: JobConfig, manifest: Manifest) -> None:
    """data.val_prepared must be a labelled gallery split at the training split's resolution."""
    import pyarrow.parquet as pq

    where = f"data.val_prepared={config.data.val_prepared!r}"
    val = read_manifest(config.data.val_prepared)
    if val.layout != "gallery":
        raise StageError(f"{where} holds {val.dataset}, which has no gallery: validate on prepared CIRR or FashionIQ")
    if val.image_size != manifest.image_size:
        raise StageError(f"{where} holds {val.image_size} px images, the training split {manifest.image_size} px")
    if pq.read_table(Path(config.data.val_prepared) / "triplets", columns=["target_id"]).column("target_id").null_count:
        raise StageError(f"{where} (split {val.split!r}) has no targets to validate against")
    if config.train.validate_every < 1:
        raise StageError(f"train.validate_every must be >= 1 epoch, got {config.train.validate_every}")


def compositor_fields(config: JobConfig) -> dict:
    """The ``DetailFusionConfig`` fields the job's ``model`` section sets: every field but the job's own (preset,
    pretrained, init_from); unset ones keep the model's."""
    fields = {f.name: getattr(config.model, f.name) for f in dataclasses.fields(config.model)
              if f.name not in ("preset", "pretrained", "init_from")}
    return {name: list(value) if isinstance(value, tuple) else value for name, value in fields.items()
            if value is not None}


def initial_model(config: JobConfig, directory: Path) -> str:
    """The exported model every rank starts from (same weights on every rank, and the cache's ViT), made once in
    ``directory`` (reused on a rerun): stage 1 without init_from builds the preset; stage 3 puts a freshly
    initialised compositor of the config's type and shape (seeded by train.seed) on the stage 2 branches."""
    import torch

    from detailfusion.library.model import build_model, model_fingerprint, save_model

    new_compositor = stage_spec(config.train).starts_from == "previous_export_new_compositor"
    if config.model.init_from and not new_compositor:
        return config.model.init_from
    source = model_fingerprint(config.model.init_from) if new_compositor else None  # the branches' export
    made_from = directory / "made_from.json"
    if (directory / "config.json").is_file() and (source is None or (made_from.is_file() and
                                                                     json.loads(made_from.read_text()) == source)):
        return str(directory)
    torch.manual_seed(config.train.seed)
    if new_compositor:
        model, tokenizer = with_new_compositor(config.model.init_from, compositor_fields(config))
    else:
        model, tokenizer = build_model(config.model.preset, pretrained=config.model.pretrained,
                                       **compositor_fields(config))
    save_model(model, tokenizer, directory)
    made_from.write_text(json.dumps(source))
    return str(directory)


def with_new_compositor(model_dir: str, fields: dict):
    """(model, tokenizer) of ``model_dir`` whose compositor is rebuilt from scratch with ``fields``."""
    from detailfusion.library.model import build_compositor, load_model

    model, tokenizer = load_model(model_dir)
    for name, value in fields.items():
        setattr(model.config, name, value)
    model.compositor = build_compositor(model.config)
    model.compositor.apply(model._init_weights)
    return model, tokenizer


def absolute_paths(config: JobConfig) -> JobConfig:
    """Local paths made absolute on the driver (Train workers run in other working directories), and
    ``model.init_from: "@stage<N>"`` resolved to stage N's export in this workdir."""
    absolute = lambda path: str(Path(path).resolve()) if path else path  # noqa: E731
    init_from = config.model.init_from
    if init_from and init_from.startswith("@"):
        if not re.fullmatch(r"@stage[0-3]", init_from):
            raise StageError(f"model.init_from={init_from!r}: a stage's export in this workdir is @stage0 .. @stage3")
        init_from = str(export_dir(config.workdir, int(init_from[-1])))
    return replace(
        config, workdir=absolute(config.workdir),
        data=replace(config.data, prepared=absolute(config.data.prepared), root=absolute(config.data.root),
                     val_prepared=absolute(config.data.val_prepared)),
        model=replace(config.model, init_from=absolute(init_from)),
    )


def run_stage(config: JobConfig, callbacks: list | None = None) -> Path:
    """Train one stage (or reuse it when finished); returns the exported model directory. ``callbacks``: Ray Train
    user callbacks (a sweep passes Ray Tune's report callback)."""
    from detailfusion.platform.ray_setup import init_ray

    called_at = time.time()
    config = absolute_paths(config)
    manifest = check_stage(config)
    spec = stage_spec(config.train)
    out, export_dir = stage_dirs(config)
    if (export_dir / "config.json").is_file() and (out / "DONE").is_file():
        print(f"[stage {spec.number}] already trained: reusing {export_dir}")
        return export_dir
    out.mkdir(parents=True, exist_ok=True)
    save_config(config, out / "config.yaml")
    init_from = initial_model(config, out / "init")
    init_ray(dashboard=True)  # Train's placement-group cleaner polls the state API (without it: a warning per poll)
    # Train's controller notices a finished worker group at its next poll: 2 s by default, 0.5 s cut a tiny stage's
    # finish from 3.3-4.8 s to 1.0-1.5 s. Read from the driver's environment and passed on to the controller.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", str(HEALTH_CHECK_INTERVAL_S))
    # Train's print patch sends a worker's print to its logger *and*, since Ray has replaced the worker's stdout, to
    # stdout as well: every progress line reached the driver twice. Off: printed once (passed on like the above).
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    if single_node():  # nothing to watch: the only node going away ends the driver too. Off, Train's watcher actor
        # is not started (one process less per stage) and its "E core_worker" line about its own restart is not printed
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    trainer = build_trainer(config, manifest, init_from, callbacks, called_at)
    held = "streamed by Ray Data" if trainer.datasets else "held in the object store"
    print(f"[stage {spec.number}] {spec.name}: {manifest.counts['triplets']} triplets from {config.data.prepared} "
          f"({held}), {config.train.num_workers} worker(s), ZeRO-{config.train.zero_stage}, {config.train.precision}, clipping "
          f"{clipping(config.train, config.optim)}", flush=True)
    tracked = stage_run(config, manifest)  # before the workers start: a wrong tracking URI fails here
    interrupt = signal.getsignal(signal.SIGINT) if threading.current_thread() is threading.main_thread() else None
    try:
        result = trainer.fit()
        if result.error is not None:
            raise result.error
    except BaseException:
        if tracked:
            try:
                finish_tracking(tracked, out, None, "FAILED")
            except Exception as exc:  # noqa: BLE001  (the training error is the one to raise)
                print(f"[stage {spec.number}] could not record the failed run in MLflow: {exc}", flush=True)
        raise
    finally:  # Train's SIGINT handler outlives fit(): a later Ctrl-C (the pipeline's next step) would abort a finished
        # controller and exit 0; the caller's handler is put back
        if interrupt is not None:
            signal.signal(signal.SIGINT, interrupt)
    cost = stage_cost(out / "metrics.csv", called_at, time.time())
    if cost:
        print(f"[stage {spec.number}] {cost['steps']} steps in {cost['train_s']:.1f} s ({cost['ms_per_step']:.0f} ms/step); "
              f"fixed cost {cost['startup_s'] + cost['finish_s']:.1f} s: start-up {cost['startup_s']:.1f} s, "
              f"finish {cost['finish_s']:.1f} s", flush=True)
    write_model_card(export_dir, config, manifest, result.metrics or {}, cost)
    (out / "DONE").write_text(json.dumps({"metrics": result.metrics, "export": str(export_dir), "cost": cost},
                                         default=str))  # the stage is done whatever its tracking does next
    if tracked:
        finish_tracking(tracked, out, export_dir if config.tracking.log_model else None, "FINISHED")
        print(f"[stage {spec.number}] MLflow run {tracked.run_id} in {tracked.uri}", flush=True)
    return export_dir


def single_node() -> bool:
    """Whether the Ray this driver joined has one node (a laptop, a test, a one-machine cluster)."""
    import ray

    return len([node for node in ray.nodes() if node.get("Alive")]) == 1


def stage_run(config: JobConfig, manifest: Manifest):
    """The stage's MLflow run (None with tracking off): the job config as params, what it trains on as tags."""
    from detailfusion.platform.tracking import open_run

    spec = stage_spec(config.train)
    return open_run(config.tracking, config.workdir, f"{config.name}-stage{spec.number}", config, tags={
        "detailfusion.kind": "stage", "detailfusion.stage": str(spec.number), "detailfusion.stage_name": spec.name,
        "detailfusion.dataset": manifest.dataset, "detailfusion.workdir": str(config.workdir)})


def finish_tracking(tracked, out: Path, export_dir: Path | None, status: str) -> None:
    """Fill the stage's run from the files the stage wrote (per-step and validation metrics, its config; the
    export with its model card when given) and close it with ``status``."""
    tracked.log_csv(out / "metrics.csv", skip=("epoch",))
    tracked.log_csv(out / "validation.csv", skip=("epoch",))
    if (out / "config.yaml").is_file():
        tracked.log_artifact(out / "config.yaml")
    if export_dir is not None:
        tracked.log_artifacts(export_dir, "model")
    tracked.end(status)


def stage_cost(metrics_csv: Path, called_at: float, returned_at: float) -> dict | None:
    """Where a stage's wall time went, from the step end times (``wall_time``) this call wrote to metrics.csv:
    start-up (the call until the first step began, one median step before its end), training, finish (last step
    to the call's return: checkpoint, export, shut-down); seconds and steps. None when no step ran."""
    import csv
    import statistics

    if not metrics_csv.is_file():
        return None
    with metrics_csv.open() as f:
        times = [row.get("wall_time") or "" for row in csv.DictReader(f)]  # "": a row from before the column existed
    ends = [float(t) for t in times if t.replace(".", "", 1).isdigit() and float(t) >= called_at]
    if not ends:
        return None
    step_s = statistics.median([b - a for a, b in zip(ends, ends[1:])]) if len(ends) > 1 else 0.0
    return {"steps": len(ends), "ms_per_step": round(step_s * 1000, 1), "train_s": round(ends[-1] - ends[0] + step_s, 2),
            "startup_s": round(ends[0] - step_s - called_at, 2), "finish_s": round(returned_at - ends[-1], 2)}


def subset_negatives(config: JobConfig) -> int:
    """Near-duplicates (img_set members) drawn per row: ``loss.subset_negatives`` where the stage's loss uses them
    (L_DI at stages 1-2, L_C at stage 3), whatever ``loss.reference_negative`` says (independent switches)."""
    return config.loss.subset_negatives if stage_spec(config.train).near_duplicates else 0


def build_trainer(config: JobConfig, manifest: Manifest, init_from: str, callbacks: list | None = None,
                  called_at: float | None = None):
    """The stage's ``TorchTrainer``: its workers load ``init_from``; ``called_at``: when the stage was called
    (time.time(), for its start-up line)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig

    from detailfusion.library.model import DetailFusionConfig, load_model
    from detailfusion.library.model.tokenizer import load_tokenizer
    from detailfusion.platform.data.feature_cache import vision_fingerprint
    from detailfusion.platform.train.faults import worker_env
    from detailfusion.platform.train.loop import train_loop_per_worker
    from detailfusion.platform.train.process_group import ProcessGroupConfig
    from detailfusion.platform.train.trainer import StageTrainer

    called_at = called_at or time.time()
    train, spec = config.train, stage_spec(config.train)
    tokenizer, max_text_length = load_tokenizer(init_from), DetailFusionConfig.from_pretrained(init_from).max_text_length
    fingerprint = None  # the model's ViT against the split's feature cache: the weights are loaded only to check it
    if config.data.use_feature_cache and manifest.features:
        fingerprint = vision_fingerprint(load_model(init_from)[0])
    cache = dict(use_features=config.data.use_feature_cache, vision_fingerprint=fingerprint)
    held, datasets, data_epochs, rows = None, None, 1, manifest.triplets
    if manifest.layout == "gallery":  # every epoch in one plan (stage 3 encodes one epoch once and reshuffles)
        data_epochs = 1 if spec.batches == "branch_outputs" else train.epochs
        held = gallery_input(
            config.data.prepared, tokenizer, max_text_length, **cache, epochs=data_epochs, seed=train.seed,
            subset_negatives=subset_negatives(config), batch_size=train.batch_size,
            holdout=(spec.trains_on, config.data.holdout_fraction))
    elif inline_bytes(config.data.prepared, config.data.use_feature_cache) <= config.data.in_memory_max_mb * 2**20:
        data_epochs = train.epochs  # a small inline split (IPr2Pr) held like a gallery split
        held = inline_input(config.data.prepared, tokenizer, max_text_length, **cache, epochs=train.epochs,
                            seed=train.seed, batch_size=train.batch_size, captions=spec.batches == "captions")
    else:  # a large inline split: Ray Data streams the shards once per epoch
        datasets = {"train": training_dataset(config.data.prepared, tokenizer, max_text_length, **cache,
                                              actor_cpus=train.data_actor_cpus, seed=train.seed,
                                              batch_size=train.batch_size, captions=spec.batches == "captions")}
    run = StageRun(weights_from=init_from, rows=held.epoch_rows if held else rows, called_at=called_at, held=held,
                   data_epochs=data_epochs)
    return StageTrainer(
        train_loop_per_worker,
        pg_cleaner=bool(callbacks),  # a sweep trial (Tune's report callback) can be stopped from outside
        train_loop_config={"job": to_dict(config), "run": run, "extensions": extensions()},
        scaling_config=ScalingConfig(num_workers=train.num_workers, use_gpu=train.use_gpu,
                                     resources_per_worker={"CPU": train.cpus_per_worker},
                                     placement_strategy=train.placement_strategy),
        torch_config=ProcessGroupConfig(backend="nccl" if train.use_gpu else "gloo"),  # keeps torch out of Train's controller
        datasets=datasets,
        run_config=RunConfig(
            name=f"{config.name}-stage{train.stage}",
            storage_path=str((stage_dirs(config)[0] / "ray").resolve()),
            checkpoint_config=CheckpointConfig(num_to_keep=train.keep_checkpoints, checkpoint_score_attribute="loss",
                                               checkpoint_score_order="min"),
            failure_config=FailureConfig(max_failures=train.max_failures),
            callbacks=callbacks,
            worker_runtime_env=worker_env(),  # a test's injected fault, if any (faults.py)
        ),
    )
