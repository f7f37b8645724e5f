"""Typed configs: frozen dataclasses loaded from YAML, with dotted ``--set a.b=c`` overrides.

Every section is a frozen dataclass; ``load_config(JobConfig, "x.yaml", ["train.lr=1e-4"])`` merges the
overrides over the file, checks every key and value type, and returns the typed, immutable config.
An unknown or mistyped key raises ``ConfigError`` naming the key and the file (or ``--set``).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from detailfusion.library.errors import ConfigError  # re-exported: callers import it from here
from detailfusion.library.index.settings import (  # noqa: F401  (re-exported: EvalConfig holds one)
    STORE_DTYPES,
    CompressedIndexConfig,
    IndexBackendConfig,
    SearchSettings,
)

T = TypeVar("T")


# ----------------------------------------------------------------------------------------------------
# Sections. Defaults are METHOD.md's (paper values where it states them, ours marked there).


@dataclass(frozen=True)
class ModelConfig:
    preset: Literal["tiny", "blip2"] = "tiny"
    pretrained: str | None = None  # blip2: local dir or hub id of a Blip2ForImageTextRetrieval checkpoint
    init_from: str | None = None  # exported model dir to start from (the previous stage's export), or "@stage<N>":
    #   stage N's export in this workdir; None: the preset
    compositor: str = "afc"  # a registered compositor (model/compositor.py), built at stage 3 on the frozen branches
    static_weights: tuple[float, float] = (0.5, 0.5)  # (a_gm, a_di) for the static compositor
    compositor_layers: int | None = None  # the AFC block's depth; None: the preset's
    compositor_heads: int | None = None  # the AFC block's heads; None: the preset's
    fusion_score: str | None = None  # a registered fusion rule (model/fusion.py); None: the model's (a preset's:
    #   DEFAULT_FUSION_RULE); set with the compositor at stage 3

    def __post_init__(self):
        from detailfusion.library.model.compositor import COMPOSITORS
        from detailfusion.library.model.configuration import check_static_weights
        from detailfusion.library.model.fusion import FUSION_RULES

        COMPOSITORS.check(self.compositor, "model.compositor")
        check_static_weights(self.static_weights, "model.static_weights")
        if self.fusion_score is not None:
            FUSION_RULES.check(self.fusion_score, "model.fusion_score")


@dataclass(frozen=True)
class LossConfig:
    gamma: float = 2.0  # L_joint = L_DI + gamma * L_GM
    # The hard negatives of L_DI (stages 1-2) and of L_C (stage 3, as gallery embeddings), each switch on its own:
    reference_negative: bool = True  # the query's own reference; false: the paper's "without L_DI" ablation (L_DI =
    #   L_GM when subset_negatives is 0 too: compare with img_set negatives off in both arms)
    hard_negative_scale: float = 1.0  # w >= 1: adds log(w) to the own reference's and subset negatives' logits
    batch_reference_negatives: bool = False  # the batch's other references too
    subset_negatives: int = 0  # K img_set members per query (CIRR near-duplicates, drawn each epoch; at stage 3 once),
    #   whatever reference_negative says
    gallery_negatives: int = 0  # stage 3 only: G gallery embeddings per step drawn from the rank's cached training
    #   gallery (its rows' distinct targets, seeded), scored by every query of the step (its own target masked out):
    #   gallery-wide negatives for L_C beyond the batch's targets; 0: off
    gather_across_ranks: bool = True  # global contrastive batch over all data-parallel ranks


@dataclass(frozen=True)
class DataConfig:
    dataset: str | None = None  # a registered dataset (library/datasets.py) the prepared split must hold; None: any
    root: str | None = None
    prepared: str | None = None  # output dir of `detailfusion prepare` for the training split
    val_prepared: str | None = None  # a prepared labelled CIRR/FashionIQ split: validation recall every epoch
    use_feature_cache: bool = True  # train on cached frozen-ViT features when the prepared split has them
    in_memory_max_mb: float = 1024.0  # an inline split (IPr2Pr) up to this size on disk is held whole in the object
    #   store like a gallery split (a fresh permutation every epoch, no Ray Data start-up); larger ones stream
    holdout_fraction: float = 0.0  # [ours] a stable share of a CIRR/FashionIQ training split that stages 1-2 never
    #   see and stage 3 trains on alone: the compositor learns on queries the branches did not fit. Held out by group
    #   (data/training_input.py holdout_groups): the scene root where the captions record one, else the img_set
    train_split: str = "train"
    val_split: str = "val"

    def __post_init__(self):
        if self.dataset is not None:
            _registered_dataset(self.dataset, "data.dataset")


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-5
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-7
    weight_decay: float = 0.05
    grad_clip: float = 1.0  # max gradient L2 norm (0: no clipping)
    clip: Literal["auto", "per_branch", "global"] = "auto"  # per_branch: each branch's norm on its own (stage 2 clips
    #   GM and DI apart: one branch's large gradient never shrinks the other's step; needs ZeRO-0, not fp16);
    #   global: one norm over everything; auto: per_branch where it can run, else global (DeepSpeed's)
    warmup_fraction: float = 0.1  # one-cycle: share of steps spent warming up
    div_factor: float = 25.0  # one-cycle: the first lr is lr / div_factor
    final_div_factor: float = 1e4  # one-cycle: the last lr is lr / (div_factor * final_div_factor)


@dataclass(frozen=True)
class TrainConfig:
    stage: Literal[0, 1, 2, 3] = 2  # 0: Q-Former image-text pre-training (tiny preset's stand-in for BLIP-2's)
    objective: str | None = None  # a registered stage objective (library/objectives.py) in place of the stage's own;
    #   None: the stage's (STAGES in platform/train/stages.py). It must read the batches the stage feeds
    epochs: int = 1
    batch_size: int = 128  # global batch, split over workers
    grad_accum: int = 1
    precision: Literal["fp32", "bf16", "fp16"] = "bf16"  # bf16/fp16: autocast over fp32 master weights
    export_precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # weights of the stage's save_pretrained export
    zero_stage: Literal[0, 1, 2, 3] = 2
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0  # Ray CPUs each worker reserves (a scheduling share)
    threads_per_worker: int = 0  # torch intra-op threads of each worker; 0: cpus_per_worker rounded up
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"  # of workers over nodes
    seed: int = 0
    checkpoint_every: int = 0  # steps between checkpoints; 0: at the end of every epoch
    keep_checkpoints: int = 2  # best N by loss (plus the latest)
    max_failures: int = 0  # worker-group restarts Ray Train may make after a crash
    log_every: int = 10  # steps between progress lines
    validate_every: int = 1  # epochs between validations (with data.val_prepared; the last epoch always)
    data_actor_cpus: float = 1.0  # CPUs of the Ray Data actor tokenising an inline split (IPr2Pr; fractional on small hosts)
    shuffle_buffer_batches: int = 8  # inline splits: each epoch's seeded local shuffle over this many micro-batches


@dataclass(frozen=True)
class TrackingConfig:
    """MLflow experiment tracking of stages, sweep trials and evaluations (``tracking.py``)."""

    enabled: bool = True
    uri: str | None = None  # any MLflow tracking URI; None: sqlite:///<workdir (stages) or out (evaluate)>/mlflow.db
    experiment: str = "detailfusion"
    log_model: bool = True  # a stage's export (weights, config, model card) as an artifact of its run


@dataclass(frozen=True)
class JobConfig:
    name: str = "detailfusion"
    workdir: str = "runs/default"
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


@dataclass(frozen=True)
class PrepareConfig:
    """``prepare``: read a dataset split, validate, decode + transform images, write canonical shards."""

    dataset: str = "cirr"  # a registered dataset (library/datasets.py)
    root: str = ""
    split: str = "val"
    out: str = ""
    preset: str = "tiny"  # image resolution comes from the model preset ...
    image_size: int | None = None  # ... unless given here (pixels)
    categories: tuple[str, ...] | None = None  # of a dataset with categories (FashionIQ); None: all of them
    max_bad_fraction: float = 0.01  # fail when more than this share of records is quarantined
    batch_size: int = 64  # images per Ray Data batch
    cache_vision_features: bool = False
    model: str | None = None  # model dir or preset whose frozen ViT fills the cache (default: ``preset``)
    encoder_actors: int = 1  # actor-pool size of the feature-cache encoder
    use_gpu: bool = False  # one GPU per encoder actor
    num_cpus: int | None = None  # CPUs of a local Ray started by the job (ignored when joining a cluster)

    def __post_init__(self):
        _registered_dataset(self.dataset, "prepare.dataset", self.categories)


@dataclass(frozen=True)
class EvalConfig:
    """``evaluate`` / ``index``: a split (prepared here unless ``prepared`` is given), a model, the protocol."""

    dataset: str = "cirr"  # a registered dataset with an evaluation protocol (library/datasets.py)
    root: str = ""  # dataset root in its original layout
    split: str = "val"  # cirr: val | test1 (writes submissions) | train; fashioniq: val | test | train
    checkpoint: str = ""  # exported model directory (save_pretrained)
    out: str = ""
    prepared: str | None = None  # prepared split to use (default: out/prepared, made by `prepare` when absent)
    index: str | None = None  # gallery index dir (default: out/index; reused when built by the same model)
    categories: tuple[str, ...] | None = None  # of a dataset with categories (FashionIQ); None: all of them
    max_bad_fraction: float = 0.01  # of the prepare step
    encoder_actors: int = 1  # Ray Data actor-pool size of the gallery and query encoders
    cpus_per_actor: float = 1.0
    use_gpu: bool = False  # one GPU per encoder actor
    batch_size: int = 64
    num_cpus: int | None = None  # CPUs of a local Ray started by the job (ignored when joining a cluster)
    seed: int = 0  # of the random baseline
    index_backend: IndexBackendConfig = field(default_factory=IndexBackendConfig)  # `index` only; evaluate refuses a
    #   non-default one (its metrics are exact search's)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def __post_init__(self):
        _registered_dataset(self.dataset, "evaluate.dataset", self.categories, evaluable=True)


@dataclass(frozen=True)
class ServeConfig:
    """``serve``: the retrieval endpoint of an exported model and its gallery index (``detailfusion index``)."""

    checkpoint: str = ""  # exported model directory
    index: str = ""  # gallery index directory built by this model
    host: str = "127.0.0.1"  # HTTP proxy address (0.0.0.0 to accept other hosts)
    port: int = 8000
    batching: bool = True  # @serve.batch dynamic batching (False: one request per forward pass)
    max_batch_size: int = 16
    batch_wait_timeout_s: float = 0.01
    min_replicas: int = 1  # model replicas, autoscaled on ongoing requests
    max_replicas: int = 2
    target_ongoing_requests: float | None = None  # per replica; None: the batch size
    upscale_delay_s: float = 3.0
    downscale_delay_s: float = 30.0
    look_back_period_s: float = 30.0  # window the autoscaler averages ongoing requests over
    max_replicas_per_node: int | None = None  # 1: every model replica on its own node (spread over hosts)
    replica_cpus: float = 1.0
    shard_cpus: float = 0.5  # per replica of an index shard's deployment (a sharded index: `index_backend.shards`)
    # placement over hosts by custom node resources (`ray start --resources`, cluster.yaml's `resources:`): shard i's
    # replicas run only on nodes offering shard_nodes[i % len] (the hosts holding its files); () : any node
    shard_nodes: tuple[str, ...] = ()
    model_node: str | None = None  # the same for the model and HTTP front replicas (e.g. the GPU hosts)
    # a shard that fails or takes longer than this (s) is left out of the answer, which is flagged "degraded", and
    # skipped for shard_retry_s before it is asked again; all shards out: 503 index_unavailable
    shard_timeout_s: float = 2.0
    shard_retry_s: float = 5.0
    frontend_cpus: float = 0.25
    use_gpu: bool = False  # one GPU per model replica
    max_body_mb: float = 8.0
    max_image_pixels: int = 40_000_000
    max_text_chars: int = 300
    max_top_k: int = 100
    # load shedding: past max_ongoing_requests searches in each model replica (None: 2 x the batch size), at most
    # max_queued_requests more wait at each Frontend replica (-1: no limit); the rest get 503 with Retry-After at once
    max_ongoing_requests: int | None = None
    max_queued_requests: int = 64
    retry_after_s: float = 1.0  # the 503's Retry-After (s, rounded up)
    # a file holding the API token (or $DETAILFUSION_API_TOKEN, not both): every route but /healthz then needs
    # `Authorization: Bearer <token>`; None and no variable: an open endpoint
    api_token_file: str | None = None
    search: SearchSettings = field(default_factory=SearchSettings)  # a compressed index's nprobe, candidates, rerank
    #   at this deployment (unset: the index's built values); no rebuild to retune recall against latency
    num_cpus: int | None = None  # CPUs of a local Ray started by `detailfusion serve`


def _registered_dataset(name: str, where: str, categories: tuple[str, ...] | None = None,
                        evaluable: bool = False) -> None:
    """``name`` is a registered dataset (with a protocol when ``evaluable``) that has ``categories``."""
    from detailfusion.library.datasets import dataset
    from detailfusion.library.datasets import evaluable as with_protocol

    found = (with_protocol if evaluable else dataset)(name, where)
    unknown = sorted(set(categories or ()) - set(found.categories))
    if unknown:
        raise ConfigError(f"{where}: {name} has no categor{'y' if len(unknown) == 1 else 'ies'} {', '.join(unknown)}"
                          f" (it has: {', '.join(found.categories) or 'none'})")


# ----------------------------------------------------------------------------------------------------
# Loading.


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> T:
    """Build ``cls`` from a YAML file (optional) and ``key.sub=value`` overrides, checking every key."""
    source = str(path) if path is not None else "<defaults>"
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ConfigError(f"{source}: cannot read config file ({exc.strerror})") from exc
        try:
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{source}: not valid YAML: {exc}") from exc
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: top level must be a mapping, got {type(raw).__name__}")
    config = from_dict(cls, raw, source=source)
    for item in overrides:
        config = apply_override(config, item)
    return config


def apply_override(config: T, item: str) -> T:
    """Return a copy of ``config`` with one ``a.b.c=value`` override applied (value parsed as YAML)."""
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {item!r}: expected key=value, e.g. train.lr=1e-4")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {item!r}: value is not valid YAML: {exc}") from exc
    return with_value(config, key.strip(), value, source=f"--set {item}")


def with_value(config: T, key: str, value: Any, source: str = "<value>") -> T:
    """A copy of ``config`` with the dotted ``key`` set to ``value`` (checked like a file's keys)."""
    nested: Any = value
    for part in reversed(key.split(".")):
        nested = {part: nested}
    return from_dict(type(config), _merge(to_dict(config), nested), source=source)


def from_dict(cls: type[T], data: dict[str, Any], source: str = "<dict>", prefix: str = "") -> T:
    """Construct dataclass ``cls`` from a mapping, refusing unknown keys and wrong types."""
    if not isinstance(data, dict):
        where = prefix.rstrip(".") or "<root>"
        raise ConfigError(f"{source}: key '{where}' must be a mapping, got {data!r} ({type(data).__name__})")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in known:
            raise ConfigError(f"{source}: unknown key '{dotted}' (known in this section: {', '.join(sorted(known))})")
        kwargs[key] = _coerce(hints[key], value, source, dotted)
    try:
        return cls(**kwargs)
    except ConfigError as exc:  # a section's own check (__post_init__): name the file or --set it came from
        raise exc if str(exc).startswith(source) else ConfigError(f"{source}: {exc}") from None


def to_dict(config: Any) -> dict[str, Any]:
    """The plain-dict (YAML-ready) form of a config: tuples become lists."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value

    return plain(config)


def save_config(config: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _coerce(hint: Any, value: Any, source: str, key: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)

    def fail(expected: str) -> ConfigError:
        return ConfigError(f"{source}: key '{key}' expects {expected}, got {value!r} ({type(value).__name__})")

    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, source, prefix=f"{key}.")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, source, key)
            except ConfigError:
                continue
        raise fail(" or ".join(_type_name(a) for a in args))
    if origin is Literal:
        if value in args and not (isinstance(value, bool) and not any(isinstance(a, bool) for a in args)):
            return value
        raise fail("one of " + ", ".join(repr(a) for a in args))
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise fail(_type_name(hint))
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, source, f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise fail(f"{len(args)} items")
        return tuple(_coerce(a, v, source, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise fail("true or false")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise fail("an integer")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-5 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise fail("a number")
    if hint is str:
        if isinstance(value, str):
            return value
        raise fail("a string")
    raise ConfigError(f"{source}: key '{key}' has an unsupported type {hint!r}")  # a bug in the dataclass


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", str(hint))
