"""The ``detailfusion`` console script, the one front door: ``detailfusion <command> [--config FILE] [--set
key=value]...`` (plus the command's flags); each command builds its typed config here and makes one call. The
scripts in ``jobs/`` (for ``ray job submit``) and ``python -m detailfusion`` call ``main`` too.

A refusal of the user's input (a bad key or value, a missing file, a stage that cannot run, bad data) prints one
line and exits 2; any other error keeps its traceback (``report_error``).
"""

from __future__ import annotations

import argparse
import sys
import time


def _synth(args: argparse.Namespace) -> int:
    from detailfusion.library.data.synthetic import write_synthetic

    start = time.perf_counter()
    what = {"detail": "detail benchmark v2", "ipr2pr-detail": "IPr2Pr of benchmark v2's scenes"}.get(
        args.kind, f"{args.kind} ({args.benchmark or 'near-duplicates'})")
    print(f"writing synthetic {what}, seed {args.seed}, to {args.out} ...", flush=True)
    held_out = tuple(t for t in (args.held_out_types or "").split(",") if t)
    summary = write_synthetic(args.kind, args.out, pairs=args.pairs, seed=args.seed, image_size=args.image_size,
                              benchmark=args.benchmark, val_pairs=args.val_pairs, test_pairs=args.test_pairs,
                              family_size=args.family_size, pairs_per_set=args.pairs_per_set,
                              held_out_types=held_out, exclude_from=args.exclude_from)
    counts = ", ".join(f"{split}: {n}" for split, n in summary.items())
    print(f"done in {time.perf_counter() - start:.1f} s -> {counts}")
    return 0


# fields a command cannot run without, from its flags or its --config file
REQUIRED = {"prepare": ("root", "out"), "evaluate": ("checkpoint", "out"), "index": ("checkpoint", "out"),
            "serve": ("checkpoint", "index")}


def _typed_config(cls, args: argparse.Namespace):
    """The ``cls`` config of a command, in this order: its ``--config`` file (else the defaults), its flags by field
    name, each ``--set key=value``. A required field left empty is refused naming both ways to set it."""
    from detailfusion.library.config import ConfigError, apply_override, load_config, with_value

    config = load_config(cls, getattr(args, "config", None))
    for key, value in vars(args).items():
        if key in cls.__dataclass_fields__ and value is not None:
            config = with_value(config, key, value, source=f"--{key.replace('_', '-')}")
    for item in args.set or []:
        config = apply_override(config, item)
    for key in REQUIRED.get(args.command, ()):
        if not getattr(config, key):
            raise ConfigError(f"detailfusion {args.command}: {key} is not set (--{key.replace('_', '-')} or "
                              f"'{key}:' in the --config file)")
    return config


def _train_config(args: argparse.Namespace):
    """The stage's JobConfig: ``--config`` (else the defaults), then ``--set``; its train.stage must be ``--stage``
    (a stage-2 config given to ``train --stage 1`` is refused before anything starts)."""
    from detailfusion.library.config import ConfigError, JobConfig, load_config, with_value

    config = load_config(JobConfig, args.config, args.set or [])
    if config.train.stage != args.stage:
        if args.config:
            raise ConfigError(f"{args.config}: train.stage is {config.train.stage}, but the command is "
                              f"`train --stage {args.stage}`")
        config = with_value(config, "train.stage", args.stage, source="--stage")
    return config


def command_config(args: argparse.Namespace):
    """The typed config a parsed command runs with, nothing started: PrepareConfig (prepare), EvalConfig
    (evaluate, index), ServeConfig (serve), JobConfig (train), (JobConfig, SweepSettings) (sweep). Raises
    ConfigError on a bad key or value."""
    from detailfusion.library.config import ConfigError, EvalConfig, PrepareConfig, ServeConfig

    if args.command == "sweep":
        return _sweep_config(args)
    if args.command == "train":
        return _train_config(args)
    classes = {"prepare": PrepareConfig, "evaluate": EvalConfig, "index": EvalConfig, "serve": ServeConfig}
    if args.command not in classes:
        raise ConfigError(f"detailfusion {args.command} has no typed config")
    return _typed_config(classes[args.command], args)


def _train(args: argparse.Namespace) -> int:
    from detailfusion.platform.train.run import run_stage

    run_stage(command_config(args))
    return 0


def _prepare(args: argparse.Namespace) -> int:
    from detailfusion.platform.data.prepare import prepare

    prepare(command_config(args))
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from detailfusion.platform.eval.evaluate import evaluate

    evaluate(command_config(args))
    return 0


def _index(args: argparse.Namespace) -> int:
    from detailfusion.platform.eval.evaluate import build_index

    build_index(command_config(args))
    return 0


def _score_cirr(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from detailfusion.library.data.reading import ReadResult, load_json
    from detailfusion.library.eval.submission import check_cirr, load_split_images, load_submission, score_cirr

    read = ReadResult()
    annotations = load_json(Path(args.annotations), list, read)
    if annotations is None:
        from detailfusion.library.errors import DataError

        raise DataError(f"--annotations {read.bad[0].source}: {read.bad[0].reason} ({read.bad[0].record})")
    recall, subset = load_submission(args.recall), load_submission(args.recall_subset)
    checks = {"gallery_size": args.gallery_size, "sources": (args.recall, args.recall_subset),
              "split": (args.split, load_split_images(args.split)) if args.split else None}
    if not any(isinstance(a, dict) and a.get("target_hard") for a in annotations):  # test1: the format check alone
        check_cirr(annotations, recall, subset, **checks)
        print(f"format check passed: both files answer all {len(annotations)} pairids of {args.annotations}; it holds "
              "no targets (test1), so the scores come from the CIRR evaluation server")
        return 0
    metrics = score_cirr(annotations, recall, subset, **checks)
    text = json.dumps(metrics, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


def _given(args: argparse.Namespace, *names: str) -> dict:
    """The flags among ``names`` given on the command line (the rest keep their config class's default)."""
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def _pipeline(args: argparse.Namespace) -> int:
    from detailfusion.platform.pipeline import PipelineConfig, run_pipeline

    config = PipelineConfig(workdir=args.workdir, overrides=tuple(args.set or ()), num_cpus=args.num_cpus,
                            **_given(args, "preset", "seed", "cirr_pairs", "test_pairs", "ipr2pr_pairs"))
    run_pipeline(config)
    return 0


def _ablate(args: argparse.Namespace) -> int:
    if args.study == "data-efficiency":
        from detailfusion.platform.data_efficiency import FRACTIONS, DataEfficiencyConfig, run_data_efficiency

        fractions = tuple(float(f) for f in args.fractions.split(",")) if args.fractions else FRACTIONS
        run_data_efficiency(DataEfficiencyConfig(
            workdir=args.workdir, fractions=fractions, overrides=tuple(args.set or ()), num_cpus=args.num_cpus,
            **_given(args, "seeds", "first_seed", "data_seed", "bootstrap", "cirr_pairs", "test_pairs",
                     "ipr2pr_pairs")))
        return 0
    if args.fractions:
        from detailfusion.library.errors import ConfigError

        raise ConfigError("--fractions: only with --study data-efficiency")
    from detailfusion.platform.ablate import AblationConfig, run_ablation

    config = AblationConfig(workdir=args.workdir, overrides=tuple(args.set or ()), num_cpus=args.num_cpus,
                            **_given(args, "preset", "seeds", "first_seed", "data_seed", "bootstrap", "cirr_pairs",
                                     "test_pairs", "ipr2pr_pairs"))
    run_ablation(config)
    return 0


def _sweep_config(args: argparse.Namespace):
    from pathlib import Path

    from detailfusion.library.config import JobConfig, load_config
    from detailfusion.platform.tune import SweepSettings

    config = load_config(JobConfig, args.config, args.set or [])
    out = args.out or str(Path(config.workdir) / "sweeps" / f"{Path(args.space).stem}-stage{args.stage}")
    settings = SweepSettings(stage=args.stage, space=args.space, out=out, num_cpus=args.num_cpus,
                             **_given(args, "num_samples", "scheduler", "metric", "mode", "grace_period",
                                      "reduction_factor", "max_concurrent_trials", "trial_cpus"))
    return config, settings


def _sweep(args: argparse.Namespace) -> int:
    from detailfusion.platform.tune import sweep

    rows = sweep(*command_config(args))
    return 0 if any(r["status"] == "FINISHED" for r in rows) else 1


def add_sweep_arguments(command: argparse.ArgumentParser) -> None:
    command.add_argument("--stage", type=int, required=True, choices=[0, 1, 2, 3], help="the stage every trial trains")
    command.add_argument("--space", required=True, help="tune-space YAML (tune_spaces/*.yaml)")
    command.add_argument("--config", required=True, help="the stage's job config (jobs/configs/*.yaml)")
    command.add_argument("--set", action="append", metavar="KEY=VALUE",
                         help="override in the job config, e.g. data.val_prepared=runs/x/prep/cirr-val")
    command.add_argument("--out", help="sweep directory (default WORKDIR/sweeps/<space>-stage<N>); rerun to resume")
    command.add_argument("--num-samples", type=int, help="draws of the space; grids are crossed with each")
    command.add_argument("--scheduler", choices=["asha", "fifo"],
                         help="asha: stop trials early on the validation score; fifo: run all to the end")
    command.add_argument("--metric",
                         help="reported metric to optimise (val_score: the stage variant's validation Avg; "
                              "any val/<variant>/<metric>, e.g. val/di/Rs@1)")
    command.add_argument("--mode", choices=["max", "min"], help="maximise or minimise the metric")
    command.add_argument("--grace-period", type=int, help="ASHA: epochs before a trial can be stopped")
    command.add_argument("--reduction-factor", type=float, help="ASHA: keep the best 1/rf per rung")
    command.add_argument("--max-concurrent-trials", type=int, help="trials at once")
    command.add_argument("--trial-cpus", type=float, help="CPU of each trial's driver function")
    command.add_argument("--num-cpus", type=int, help="CPUs of a local Ray (ignored under ray job submit)")


def _serve(args: argparse.Namespace) -> int:
    from detailfusion.platform.serving.run import serve_forever

    serve_forever(command_config(args))
    return 0


def _config_argument(command: argparse.ArgumentParser, config_class: str) -> None:
    command.add_argument("--config", help=f"YAML file of {config_class} keys; flags and --set override it")


def _eval_arguments(command: argparse.ArgumentParser) -> None:
    _config_argument(command, "EvalConfig")
    command.add_argument("--dataset", help="a registered dataset with an evaluation protocol (cirr, fashioniq, ...)")
    command.add_argument("--root", help="dataset root in its original layout (prepared for the model's resolution)")
    command.add_argument("--split", help="cirr: val|test1|train; fashioniq: val|test|train")
    command.add_argument("--checkpoint", help="exported model directory (save_pretrained)")
    command.add_argument("--prepared", help="an already prepared split to use instead of --root")
    command.add_argument("--categories", nargs="+", help="of a dataset with categories (FashionIQ): which (default: all)")
    command.add_argument("--encoder-actors", type=int, help="Ray Data actor-pool size of the encoders")
    command.add_argument("--cpus-per-actor", type=float, help="CPUs per encoder actor")
    command.add_argument("--use-gpu", action="store_true", default=None, help="one GPU per encoder actor")
    command.add_argument("--batch-size", type=int, help="images or queries per batch")
    command.add_argument("--num-cpus", type=int, help="CPUs of a local Ray (ignored under ray job submit)")
    command.add_argument("--set", action="append", metavar="KEY=VALUE", help="any EvalConfig field")


def _pretrain_vit(args: argparse.Namespace) -> int:
    from detailfusion.library.vit_pretraining import PretrainConfig, benchmark_scene_keys, pretrain_vit, save_vit

    exclude = set().union(*(benchmark_scene_keys(root) for root in args.exclude or []))
    result = pretrain_vit(PretrainConfig(**_given(args, "seed", "steps", "batch_size", "corpus_size")), exclude=exclude,
                          log=lambda line: print(line, flush=True))
    flags = {"--seed": args.seed, "--out": args.out, "--steps": args.steps, "--batch-size": args.batch_size,
             "--corpus-size": args.corpus_size}
    command = " ".join(["detailfusion pretrain-vit", *(f"{k} {v}" for k, v in flags.items() if v is not None),
                        *(f"--exclude {root}" for root in args.exclude or [])])
    print(f"wrote the ViT to {save_vit(result, args.out, command)}")
    return 0


def _local_cluster(args: argparse.Namespace) -> int:
    from detailfusion.platform import local_cluster

    if args.action == "up":
        print(f"starting the hosts under {args.dir} ...", flush=True)
        cluster = local_cluster.up(args.dir, **_given(args, "hosts", "cpus_per_host", "subnet", "object_store_mb"))
        print(local_cluster.usage(cluster))
    else:
        local_cluster.down(args.dir)
    return 0


def _benchmark_size_arguments(parser: argparse.ArgumentParser) -> None:
    """--cirr-pairs / --test-pairs / --ipr2pr-pairs of pipeline and ablate (defaults: their config's)."""
    parser.add_argument("--cirr-pairs", type=int, help="detail benchmark v2 train queries")
    parser.add_argument("--test-pairs", type=int, help="its test1 queries (val: as many, at most 1,000)")
    parser.add_argument("--ipr2pr-pairs", type=int, help="synthetic IPr2Pr pairs for stage 1")


class _DefaultsFromConfig(argparse.HelpFormatter):
    """Ends a flag's help with its default as the command's typed config (or function) defines it, read only when
    the help is printed: the defaults live in the configs, once, and ``--help`` stays fast."""

    def __init__(self, prog: str, source: tuple[str, str] | None = None):
        super().__init__(prog)
        self.source = source

    def _get_help_string(self, action: argparse.Action) -> str:
        shown = self.source and action.help and action.nargs != 0  # not for on/off switches
        default = _config_default(self.source, action.dest) if shown else None
        return action.help if default in (None, "") else f"{action.help} (default: {default})"


def _config_default(source: tuple[str, str], name: str):
    """The default of field or parameter ``name`` of ``module:attribute`` (a dataclass or a function); None if none."""
    import dataclasses
    import importlib
    import inspect

    module, attribute = source
    found = getattr(importlib.import_module(module), attribute)
    if dataclasses.is_dataclass(found):
        field = next((f for f in dataclasses.fields(found) if f.name == name), None)
        if field is None:
            return None
        value = field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default
        return None if value is dataclasses.MISSING else value
    parameter = inspect.signature(found).parameters.get(name)
    return None if parameter is None or parameter.default is inspect.Parameter.empty else parameter.default


class _Parser(argparse.ArgumentParser):
    """A subcommand's parser; ``defaults_from`` (module, attribute) names the typed config its flags fill."""

    def __init__(self, *args, defaults_from: tuple[str, str] | None = None, **kwargs):
        self.defaults_from = defaults_from  # before argparse's __init__, which formats the -h flag
        super().__init__(*args, **kwargs)

    def _get_formatter(self):
        return _DefaultsFromConfig(self.prog, self.defaults_from)


CONFIG = "detailfusion.library.config"


def build_parser(prog: str = "detailfusion") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    synth = commands.add_parser(
        "synth", help="write a procedural CIR dataset in the on-disk format of CIRR, FashionIQ or IPr2Pr, or the detail "
                      "benchmark v2 (CIRR format; --kind detail)"
    )
    synth.add_argument("--kind", required=True,
                       help="a registered synthetic kind: cirr, fashioniq, ipr2pr (their on-disk formats); detail: benchmark v2 (local and global edits, every img_set member one edit from the "
                            "reference, each query tagged; --pairs train queries, 10 per scene root); ipr2pr-detail: "
                            "stage 1's corpus of v2's scenes, every edit type (IPr2Pr's parquet layout)")
    synth.add_argument("--out", required=True, help="output directory (the dataset root)")
    synth.add_argument("--pairs", type=int,
                       help="total pairs over all splits (default 2000); --benchmark detail: train pairs (2000); "
                            "--kind detail: train queries (10000)")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--image-size", type=int, help="rendered image side in pixels (default 128; --kind detail: 64)")
    synth.add_argument("--benchmark", choices=["near-duplicates", "detail"],
                       help="cirr: near-duplicates (each img_set alone, default) or detail (families of sibling "
                            "img_sets whose images share the target's shapes, so only the text decides)")
    synth.add_argument("--val-pairs", type=int, help="--kind detail: val queries (1000); --benchmark detail: (500)")
    synth.add_argument("--test-pairs", type=int, help="--kind detail: test1 queries (4000); --benchmark detail: (2000)")
    synth.add_argument("--family-size", type=int, help="--benchmark detail: img_sets per family (24)")
    synth.add_argument("--pairs-per-set", type=int, help="--benchmark detail: queries per img_set, of its 10 (5)")
    synth.add_argument("--held-out-types", help="--kind detail: edit types absent from train and val, comma-separated "
                                                "(e.g. move,resize,texture,rotation; test1 keeps them)")
    synth.add_argument("--exclude-from", help="--kind ipr2pr-detail: a benchmark v2 root whose test1 scenes never "
                                              "appear")
    synth.set_defaults(run=_synth)

    prep = commands.add_parser(
        "prepare", defaults_from=(CONFIG, "PrepareConfig"), help="read, validate, decode and transform a dataset split into canonical parquet shards (Ray Data)"
    )
    _config_argument(prep, "PrepareConfig")
    prep.add_argument("--dataset", help="a registered dataset (cirr, fashioniq, ipr2pr, ...)")
    prep.add_argument("--root", help="dataset root in its original on-disk layout")
    prep.add_argument("--split", help="cirr: train|val|test1; fashioniq: train|val|test; ipr2pr: train")
    prep.add_argument("--out", help="output directory (shards, gallery, quarantine, manifest)")
    prep.add_argument("--preset", help="model preset whose image resolution to use")
    prep.add_argument("--image-size", type=int, help="override the preset's resolution (pixels)")
    prep.add_argument("--categories", nargs="+", help="of a dataset with categories (FashionIQ): which (default: all)")
    prep.add_argument("--max-bad-fraction", type=float, help="fail above this share of quarantined records")
    prep.add_argument("--batch-size", type=int, help="images per Ray Data batch")
    prep.add_argument("--cache-vision-features", action="store_true", default=None,
                      help="also encode every image once with the frozen ViT and store the token features")
    prep.add_argument("--model", help="model dir or preset for the feature cache (default: --preset)")
    prep.add_argument("--encoder-actors", type=int, help="actor-pool size of the feature-cache encoder")
    prep.add_argument("--use-gpu", action="store_true", default=None, help="one GPU per encoder actor")
    prep.add_argument("--num-cpus", type=int, help="CPUs of a local Ray (ignored under ray job submit)")
    prep.add_argument("--set", action="append", metavar="KEY=VALUE", help="any PrepareConfig field")
    prep.set_defaults(run=_prepare)

    tr = commands.add_parser(
        "train", help="train one stage (0-3) on Ray Train + DeepSpeed from a job config; a finished stage is reused, "
                      "an interrupted one resumes"
    )
    tr.add_argument("--stage", type=int, required=True, choices=[0, 1, 2, 3], help="the stage the config trains")
    tr.add_argument("--config", help="the stage's job config (jobs/configs/stage<N>_*.yaml)")
    tr.add_argument("--set", action="append", metavar="KEY=VALUE", help="any JobConfig key, e.g. train.epochs=1")
    tr.set_defaults(run=_train)

    ev = commands.add_parser(
        "evaluate", defaults_from=(CONFIG, "EvalConfig"), help="score a model on a split with the field's protocol, every ablation variant; CIRR test1: "
                         "the server's submission files"
    )
    _eval_arguments(ev)
    ev.add_argument("--out", help="output directory (metrics.json, submissions, prepared/, index/)")
    ev.add_argument("--index", help="gallery index dir to use or build (default OUT/index)")
    ev.set_defaults(run=_evaluate)

    score = commands.add_parser(
        "score-cirr", help="score CIRR submission files against labelled annotations, as the CIRR server does (unlabelled "
        "test1 annotations: its format check only)"
    )
    score.add_argument("--annotations", required=True, help="labelled captions, e.g. captions/cap.rc2.val.json")
    score.add_argument("--recall", required=True, help="submission file with metric 'recall' (top 50)")
    score.add_argument("--recall-subset", required=True, help="submission file with metric 'recall_subset' (top 3)")
    score.add_argument("--split", help="the split's image list, e.g. image_splits/split.rc2.test1.json: every "
                       "submitted name must be one of its images")
    score.add_argument("--gallery-size", type=int,
                       help="images in the split's gallery, when under 51 (rankings then hold all but the reference)")
    score.add_argument("--out", help="also write the metrics JSON here")
    score.set_defaults(run=_score_cirr)

    idx = commands.add_parser("index", defaults_from=(CONFIG, "EvalConfig"), help="encode a split's gallery once into a search index: exact, or compressed "
                              "with --set index_backend.kind=ivfpq (docs/evaluation.md)")
    _eval_arguments(idx)
    idx.add_argument("--out", help="index directory")
    idx.set_defaults(run=_index)

    pipe = commands.add_parser(
        "pipeline", defaults_from=("detailfusion.platform.pipeline", "PipelineConfig"), help="synth -> prepare -> stage 0, 1, 2, 3 -> evaluate -> index -> report.md, reusing finished steps"
    )
    pipe.add_argument("--preset", choices=["tiny"], help="model preset (the pipeline runs tiny)")
    pipe.add_argument("--workdir", required=True, help="run directory (data, prepared splits, stages, eval, report)")
    _benchmark_size_arguments(pipe)
    pipe.add_argument("--seed", type=int, help="the benchmark's and the stages' seed")
    pipe.add_argument("--set", action="append", metavar="KEY=VALUE", help="override in every stage config, e.g. train.epochs=1")
    pipe.add_argument("--num-cpus", type=int, help="CPUs of the local Ray (default: all)")
    pipe.set_defaults(run=_pipeline)

    abl = commands.add_parser(
        "ablate", defaults_from=("detailfusion.platform.ablate", "AblationConfig"), help="the paper's ablation table on the synthetic detail benchmark: every row trained by the stage "
                       "jobs for each seed, mean ± std, root- and seed-level 95 %% intervals (docs/claims.md) -> "
                       "ablation.md/.json/.png"
    )
    abl.add_argument("--preset", choices=["tiny"], help="model preset")
    abl.add_argument("--workdir", required=True, help="run directory (benchmark, every seed's runs, ablation.*)")
    abl.add_argument("--seeds", type=int, help="training seeds (initialisation and data order)")
    abl.add_argument("--first-seed", type=int, help="seeds are first-seed .. first-seed + seeds - 1")
    _benchmark_size_arguments(abl)
    abl.add_argument("--data-seed", type=int, help="the benchmark's seed, fixed over training seeds")
    abl.add_argument("--bootstrap", type=int, help="bootstrap resamples per interval")
    abl.add_argument("--set", action="append", metavar="KEY=VALUE", help="override in every stage config, e.g. train.epochs=1")
    abl.add_argument("--num-cpus", type=int, help="CPUs of the local Ray (default: all)")
    abl.add_argument("--study", default="rows", choices=["rows", "data-efficiency"],
                     help="rows: the ablation table (default); data-efficiency: stage 2 on fractions of its rows, with "
                          "and without stage 1, on a benchmark with edit types held out of train (--ipr2pr-pairs: "
                          "stage 1's corpus, default 10x --cirr-pairs) -> data_efficiency.md/.json/.png")
    abl.add_argument("--fractions", help="--study data-efficiency: stage 2's shares of its scene roots (0.1,0.25,1)")
    abl.set_defaults(run=_ablate)

    sw = commands.add_parser(
        "sweep", defaults_from=("detailfusion.platform.tune", "SweepSettings"), help="Ray Tune sweep of one stage over a tune space, trials scored on validation recall (ASHA)"
    )
    add_sweep_arguments(sw)
    sw.set_defaults(run=_sweep)

    srv = commands.add_parser(
        "serve", defaults_from=(CONFIG, "ServeConfig"), help="Ray Serve retrieval endpoint (POST /search, GET /, /healthz) of a model and its gallery index"
    )
    _config_argument(srv, "ServeConfig")
    srv.add_argument("--checkpoint", help="exported model directory (save_pretrained)")
    srv.add_argument("--index", help="gallery index built by this model (detailfusion index)")
    srv.add_argument("--host", help="HTTP address (0.0.0.0 for other hosts)")
    srv.add_argument("--port", type=int, help="HTTP port")
    srv.add_argument("--use-gpu", action="store_true", default=None, help="one GPU per model replica")
    srv.add_argument("--num-cpus", type=int, help="CPUs of a local Ray (ignored when joining a cluster)")
    srv.add_argument("--set", action="append", metavar="KEY=VALUE",
                     help="any ServeConfig field, e.g. max_replicas=4, max_batch_size=32, batching=false")
    srv.set_defaults(run=_serve)

    lc = commands.add_parser(
        "local-cluster", defaults_from=("detailfusion.platform.local_cluster", "up"), help="a multi-host Ray cluster on this machine (network namespaces; root, Linux) for testing"
    )
    lc.add_argument("action", choices=["up", "down"], help="up: make the hosts and start Ray; down: remove all of it")
    lc.add_argument("--dir", required=True, help="cluster directory (cluster.json, token, Ray temp dirs); keep it short")
    lc.add_argument("--hosts", type=int, help="hosts (network namespaces), the head on the first")
    lc.add_argument("--cpus-per-host", type=float, help="CPUs each host offers Ray")
    lc.add_argument("--subnet",
                    help="first three octets of the hosts' private /24 (default: the first free 10.77.N)")
    lc.add_argument("--object-store-mb", type=int, help="object store per host in MiB")
    lc.set_defaults(run=_local_cluster)

    vit = commands.add_parser(
        "pretrain-vit", defaults_from=("detailfusion.library.vit_pretraining", "PretrainConfig"), help="pre-train the tiny preset's frozen stand-in ViT once (CLIP's image-text contrastive "
                             "objective on rendered synthetic scenes and captions; CPU, minutes); ships in "
                             "model/presets/tiny_vit"
    )
    vit.add_argument("--seed", type=int, help="corpus stream, initialisation and data order")
    vit.add_argument("--out", required=True, help="output directory (model.safetensors, config.json, README.md)")
    vit.add_argument("--steps", type=int, help="optimizer steps")
    vit.add_argument("--batch-size", type=int, help="image-caption pairs per step, whole groups of 4")
    vit.add_argument("--corpus-size", type=int, help="rendered corpus scenes, besides those held out")
    vit.add_argument("--exclude", action="append", metavar="ROOT",
                     help="a detail benchmark v2 root whose test1 scenes the corpus must not contain (repeatable)")
    vit.set_defaults(run=_pretrain_vit)
    return parser


def report_error(prog: str, exc: BaseException) -> None:
    """A refusal (``errors.UserError``: a config, data, stage or request the job will not take; or a missing file)
    is one line; anything else (torch, Ray Train's failed run, a library, our own bug) comes with its traceback, so
    nothing deep in a run is reduced to one line."""
    import traceback

    from detailfusion.library.errors import UserError

    if not isinstance(exc, (UserError, FileNotFoundError)):
        traceback.print_exception(exc, file=sys.stderr)
    print(f"{prog}: error: {exc}", file=sys.stderr)


def main(argv: list[str] | None = None, prog: str = "detailfusion") -> int:
    """Run one command: 0 done, 2 refused or failed (the reason on stderr, see ``report_error``), else the
    command's own code (a sweep whose trials all failed: 1)."""
    args = build_parser(prog).parse_args(argv)
    try:
        return args.run(args)
    except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM (ray_setup.stop_on_sigterm): what ran is stopped and freed
        said = str(exc) or "interrupted; rerun the same command to resume where it can"
        print(f"{prog} {args.command}: {said}", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001  (reported: one line for a refusal, with its traceback otherwise)
        report_error(f"{prog} {args.command}", exc)
        return 2


if __name__ == "__main__":
    sys.exit(main())
