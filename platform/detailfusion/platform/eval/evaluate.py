"""The ``evaluate`` and ``index`` jobs: prepare the split for the model's resolution (reused when done), encode
the gallery once (the index) and the queries, score every ablation variant under the field's protocol.

``out/`` of ``evaluate``: ``metrics.json`` (labelled splits: per-variant metrics, the same by edit family and
direction where the caption records carry them, and on the unimodal-hard queries; always: protocol, tie rule,
counts, model fingerprint, AFC weight summary, by tag where known), ``fusion_weights.csv`` (per query a_gm, a_di,
and on synthetic data edit type, family, direction, scene root), CIRR: ``cirr_<split>_recall.json`` /
``cirr_<split>_recall_subset.json`` (the server's format, main variant) and ``submissions/<variant>/`` the same
for every variant; FashionIQ without targets (test): ``fashioniq_<split>_<category>.json`` predictions
(``fashioniq_predictions.py``, main variant) and ``submissions/<variant>/`` the same; ``prepared/`` and
``index/``. Rankings are checked against the split's caption files before they are written: every query of the
annotations must be answered.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow.parquet as pq
import torch

from detailfusion.library.config import EvalConfig, IndexBackendConfig, PrepareConfig
from detailfusion.library.data.manifest import read_manifest
from detailfusion.library.data.query_tags import DIRECTIONS, FAMILIES, QueryTag
from detailfusion.library.datasets import Dataset, dataset, evaluable
from detailfusion.library.errors import ConfigError, DataError
from detailfusion.library.eval.metrics import TIE_RULE
from detailfusion.library.eval.protocols import Protocol, SplitRanks
from detailfusion.library.eval.query_subsets import by_tag, unimodal_hard
from detailfusion.library.eval.variants import variant_names, variant_queries
from detailfusion.library.index.exact import GalleryIndex
from detailfusion.library.index.store import stored_backend, write_index
from detailfusion.library.model.inference import image_size
from detailfusion.platform.eval.encode import EncodeOptions, encode_gallery, encode_queries

if TYPE_CHECKING:
    from detailfusion.library.index.compressed import CompressedIndex
    from detailfusion.library.index.sharded import ShardedIndex


def _model_facts(checkpoint: str) -> tuple[dict, str]:
    from detailfusion.library.model import model_fingerprint

    path = Path(checkpoint)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"--checkpoint {checkpoint}: no exported model there (config.json missing)")
    return json.loads((path / "config.json").read_text()), model_fingerprint(path)


def prepared_split(config: EvalConfig, image_size: int) -> Path:
    """The prepared split at the model's resolution: ``config.prepared`` if given, else made under out/prepared."""
    from detailfusion.platform.data.prepare import prepare

    if config.prepared:
        manifest = read_manifest(config.prepared)
        if manifest.image_size != image_size:
            raise DataError(f"{config.prepared} holds {manifest.image_size} px images; the model takes {image_size}")
        return Path(config.prepared)
    if not config.root:
        raise ConfigError("give --root (the dataset directory) or --prepared (a prepared split)")
    out = Path(config.out) / "prepared"
    prepare(PrepareConfig(dataset=config.dataset, root=config.root, split=config.split, out=str(out),
                          image_size=image_size, categories=config.categories,
                          max_bad_fraction=config.max_bad_fraction, num_cpus=config.num_cpus))
    return out


def _options(config: EvalConfig) -> EncodeOptions:
    return EncodeOptions(config.encoder_actors, config.cpus_per_actor, config.use_gpu, config.batch_size)


def gallery_index(config: EvalConfig, prepared: Path, fingerprint: str, directory: Path) -> GalleryIndex:
    """Load the index in ``directory`` when this model built it from this split, else encode and save it."""
    manifest = read_manifest(prepared)
    try:
        index = GalleryIndex.load(directory, fingerprint)
        if index.source.get("config_hash") == manifest.config_hash:
            print(f"index: reusing {directory} ({len(index)} images)", flush=True)
            return index
    except (FileNotFoundError, ValueError):
        pass
    index = _encode(config, prepared, fingerprint, directory)
    write_index(index, directory)  # exact
    return index


def _encode(config: EvalConfig, prepared: Path, fingerprint: str, directory: Path) -> GalleryIndex:
    """The split's gallery encoded (Ray Data actors) into an exact index in memory, for ``directory``; its speed
    printed."""
    start = time.perf_counter()
    index = encode_gallery(prepared, config.checkpoint, fingerprint, _options(config))
    seconds = time.perf_counter() - start
    nodes = ", ".join(f"{ip}: {n}" for ip, n in index.source["encoded_on"].items())
    print(f"index: encoded {len(index)} gallery images in {seconds:.1f} s ({len(index) / seconds:.0f} images/s) "
          f"on {len(index.source['encoded_on'])} node(s) ({nodes}) -> {directory}", flush=True)
    return index


def build_index(config: EvalConfig) -> GalleryIndex | CompressedIndex | ShardedIndex:
    """The ``index`` job: the split's gallery index in ``config.index`` (or ``config.out``), of the backend
    ``config.index_backend`` names: exact (reused when this model built it from this split) or ivfpq (compressed,
    built anew each run)."""
    from detailfusion.platform.ray_setup import init_ray

    _, fingerprint = _model_facts(config.checkpoint)
    exact = config.index_backend.kind == "exact"
    if not exact and importlib.util.find_spec("faiss") is None:  # refused before anything is encoded
        raise ConfigError("index_backend.kind=ivfpq needs FAISS: pip install -e \".[faiss]\"")
    init_ray(config.num_cpus)
    prepared = prepared_split(config, image_size(config.checkpoint))
    directory = Path(config.index or config.out)
    if exact:
        if config.index_backend.shards == 1:
            return gallery_index(config, prepared, fingerprint, directory)
        return write_index(_encode(config, prepared, fingerprint, directory), directory, config.index_backend)
    from detailfusion.library.model import DetailFusionConfig
    from detailfusion.platform.eval.index_build import build_compressed

    model = DetailFusionConfig.from_pretrained(config.checkpoint)
    return build_compressed(prepared, config.checkpoint, fingerprint, model.fusion_score, model.num_query_tokens,
                            directory, config.index_backend, _options(config))


def evaluate(config: EvalConfig) -> dict:
    """Run the protocol for every variant; returns (and writes) the metrics.json content."""
    from detailfusion.platform.ray_setup import init_ray

    start = time.perf_counter()
    if not config.out:
        raise ConfigError("give --out (the output directory)")
    if config.index_backend != IndexBackendConfig():  # the protocol's metrics are exact search's, never an ANN's
        raise ConfigError("evaluate ranks with the exact index, the reference every metric is defined on; "
                          "index_backend is the `detailfusion index` command's (the catalogue benchmark measures a "
                          "compressed index's recall against exact search)")
    out = Path(config.out)
    index_dir = Path(config.index) if config.index else out / "index"
    if stored_backend(index_dir) not in (None, "exact"):  # never overwritten by the exact one evaluate builds
        raise ConfigError(f"--index {index_dir} holds an index of backend {stored_backend(index_dir)!r}; evaluate "
                          "ranks with the exact index (the reference): give another --index")
    model_config, fingerprint = _model_facts(config.checkpoint)
    out.mkdir(parents=True, exist_ok=True)
    init_ray(config.num_cpus)
    prepared = prepared_split(config, image_size(config.checkpoint))
    protocol = evaluable(config.dataset, "evaluate.dataset").protocol
    annotations = caption_records(prepared, protocol)  # read (and refused if unreadable) before any encoding
    triplets = pq.read_table(prepared / "triplets")
    tags = query_tags(prepared, dataset(config.dataset), triplets.column("sample_id").to_pylist())
    index = gallery_index(config, prepared, fingerprint, index_dir)
    labelled = triplets.column("target_id").null_count == 0
    print(f"evaluate: encoding {triplets.num_rows} queries", flush=True)
    features = encode_queries(prepared, config.checkpoint, triplets, _options(config))
    compositor = model_config.get("compositor", "afc")
    variants = variant_names(compositor)
    queries = variant_queries(features, index, triplets.column("reference_id").to_pylist(), compositor)
    result = {
        "dataset": config.dataset, "split": config.split, "checkpoint": str(config.checkpoint),
        "model_fingerprint": fingerprint, "compositor": compositor, "main_variant": compositor,
        "protocol": protocol.description, "tie_rule": TIE_RULE,
        "counts": {"queries": triplets.num_rows, "gallery": len(index)},
    }
    gallery = pq.read_table(prepared / "gallery.parquet", columns=["image_id", "category"])
    ranks = protocol.split_ranks(triplets, gallery, index, queries, variants, config.seed) if labelled else None
    written = protocol.write_predictions(out, config.split, triplets, gallery, index, queries, variants, annotations,
                                         main=compositor, labelled=labelled, seed=config.seed)
    if written is not None:
        result[protocol.predictions_key] = written
    if ranks is not None:
        result["variants"] = {variant: ranks.metrics(variant) for variant in variants}
        result.update(_query_subsets(ranks, variants, tags, result["counts"]))
    result["fusion_weights"] = _weights_summary(features.weights, tags)
    _write_weights(out / "fusion_weights.csv", features.sample_ids, features.weights, tags)
    result["seconds"] = round(time.perf_counter() - start, 1)
    (out / "metrics.json").write_text(json.dumps(result, indent=1))
    _print_table(result)
    _track(config, result, out)
    return result


def _track(config: EvalConfig, result: dict, out: Path) -> None:
    """The evaluation's MLflow run: its config, every variant's metrics (``<variant>/<metric>``), metrics.json."""
    from detailfusion.platform.tracking import open_run

    tracked = open_run(config.tracking, out, f"evaluate-{config.dataset}-{config.split}", config, tags={
        "detailfusion.kind": "evaluation", "detailfusion.dataset": config.dataset, "detailfusion.split": config.split,
        "detailfusion.model_fingerprint": result["model_fingerprint"]})
    if tracked is None:
        return
    now = int(time.time() * 1000)
    tables = {"": result.get("variants") or {}, "unimodal_hard/": result.get("unimodal_hard", {}).get("variants", {})}
    tables.update({f"{key}/{label}/": table for key in ("by_family", "by_direction")
                   for label, table in result.get(key, {}).items()})
    tracked.log_metrics([(f"{prefix}{variant}/{name}", value, 0, now) for prefix, table in tables.items()
                         for variant, metrics in table.items() for name, value in metrics.items()]
                        + [("queries", result["counts"]["queries"], 0, now)])
    tracked.log_artifact(out / "metrics.json")
    tracked.end()


def caption_records(prepared: Path, protocol: Protocol) -> dict[str | None, list[dict]]:
    """The split's caption records, from the annotation files the prepared split was made from, keyed as the
    protocol's ``caption_files`` (CIRR: {None: records}; FashionIQ: {category: records} of the split's categories)."""
    manifest = read_manifest(prepared)
    categories = sorted(set(pq.read_table(prepared / "gallery.parquet", columns=["category"])
                            .column("category").to_pylist()) - {None})
    records = {}
    for key, name in protocol.caption_files(manifest.split, categories).items():
        path = Path(manifest.source) / name
        try:
            records[key] = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise FileNotFoundError(f"{path}: the annotations {prepared} was prepared from cannot be read ({exc}); every "
                                    "query of them must be answered, so evaluate needs them") from None
    return records


TAGGED = (("by_edit_type", "edit_type"), ("by_family", "edit_family"), ("by_direction", "direction"))


def query_tags(prepared: Path, source: Dataset, sample_ids: list[str]) -> list[QueryTag | None]:
    """Each query's tag (edit type, family, direction, scene root) where the dataset reads them (``query_tags``:
    synthetic CIRR roots' caption records), else None; a family or direction outside the known ones is refused."""
    if source.query_tags is None:
        return [None] * len(sample_ids)
    manifest = read_manifest(prepared)
    tags = source.query_tags(manifest.source, manifest.split)
    found = [tags.get(sample_id) for sample_id in sample_ids]
    for sample_id, tag in zip(sample_ids, found):
        if tag and (tag.edit_family not in (None, *FAMILIES) or tag.direction not in (None, *DIRECTIONS)):
            files = source.protocol.caption_files(manifest.split, []).values() if source.protocol else ()
            where = ", ".join(str(Path(manifest.source) / name) for name in files) or manifest.source
            raise DataError(f"{where}: query "
                            f"{sample_id} has edit_family {tag.edit_family!r}, direction {tag.direction!r}; known: "
                            f"{', '.join(FAMILIES)} and {', '.join(DIRECTIONS)}")
    return found


def _labels(tags: list[QueryTag | None], field: str) -> list[str | None]:
    return [getattr(tag, field) if tag else None for tag in tags]


def _query_subsets(ranks: SplitRanks, variants: list[str], tags: list[QueryTag | None], counts: dict) -> dict:
    """``by_family`` / ``by_direction`` ({value: {variant: metrics}}) where queries carry them, their query counts
    put into ``counts``; ``unimodal_hard``."""
    found = {}
    for key, field in TAGGED[1:]:
        labels = _labels(tags, field)
        if any(labels):
            found[key], counts[key] = by_tag(ranks, variants, labels)
    found["unimodal_hard"] = unimodal_hard(ranks, variants)
    return found


def _weights_summary(weights: torch.Tensor, tags: list[QueryTag | None]) -> dict | None:
    """Mean / spread of the compositor's a_di over queries, and by edit type, edit family and direction where
    known; None without weights."""
    if torch.isnan(weights).all():
        return None

    def stats(values: torch.Tensor) -> dict:
        return {"n": len(values), "mean_a_di": values.mean().item(),
                "std_a_di": values.std().item() if len(values) > 1 else 0.0,
                "min_a_di": values.min().item(), "max_a_di": values.max().item()}

    a_di = weights[:, 1]
    summary = {"all": stats(a_di)}
    for key, field in TAGGED:
        labels = _labels(tags, field)
        kinds = sorted({label for label in labels if label})
        if kinds:
            summary[key] = {k: stats(a_di[[i for i, label in enumerate(labels) if label == k]]) for k in kinds}
    return summary


def _write_weights(path: Path, sample_ids: list[str], weights: torch.Tensor, tags: list[QueryTag | None]) -> None:
    fields = ("edit_type", "edit_family", "direction", "scene_root")
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["sample_id", "a_gm", "a_di", *fields])
        for sample_id, (a_gm, a_di), tag in zip(sample_ids, weights.tolist(), tags):
            values = [getattr(tag, field) if tag else None for field in fields]
            writer.writerow([sample_id, f"{a_gm:.6f}", f"{a_di:.6f}", *("" if v is None else v for v in values)])


def _print_table(result: dict) -> None:
    variants = result.get("variants") or {}
    if not variants:
        written = result.get("submissions") or result.get("predictions") or {}
        print(f"evaluate: {result['counts']['queries']} unlabelled queries answered; rankings written for "
              f"{', '.join(written)} (main: {result['main_variant']})")
        return
    names = list(next(iter(variants.values())))
    names = [n for n in names if "/" not in n]
    print(f"{'variant':<14}" + "".join(f"{n:>8}" for n in names))
    for variant, metrics in variants.items():
        print(f"{variant:<14}" + "".join(f"{metrics[n]:8.2f}" for n in names))
    hard = result["unimodal_hard"]
    main = hard["variants"].get(result["main_variant"], {}).get("Avg")
    print(f"unimodal-hard queries (target in the top {hard['k']} of neither image_only nor text_only): "
          f"{hard['queries']} of {result['counts']['queries']}" + (f"; {result['main_variant']} Avg on them "
                                                                   f"{main:.2f}" if main is not None else ""))
    for key in ("by_family", "by_direction"):
        if key in result:
            print(f"{key}: " + ", ".join(f"{label} {n} queries" for label, n in result["counts"][key].items()))
