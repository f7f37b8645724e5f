"""``detailfusion ablate --study data-efficiency``: does stage 1 pay off? Stage 2 on 10 %, 25 % and 100 % of its
rows, each from stage 1's export and from stage 0's (no stage 1), per seed, scored on test1 (issue 33, point 3).

The benchmark is v2 with edit types held out of its train and val splits (``HELD_OUT_TYPES``: two local, two global;
test1 keeps every type); stage 1 trains the DI branch on a synthetic IPr2Pr corpus of benchmark v2's world
(``synthetic_ipr2pr``) ten times stage 2's queries, with every edit type, and no scene of test1; stage 0 pre-trains
the Q-Former on its first ``stage0_pairs`` rows. A fraction keeps whole scene roots (a stable hash, so 10 % is inside
25 %), and every stage-2 run makes the same number of optimizer steps (epochs x 1 / fraction): the arms differ in the
data they saw, not in compute. Every other setting is the tiny preset's (``configs/stage<N>_tiny.yaml``).

Output (``DIR``): ``data_efficiency.json`` (per fraction and arm: DI and GM metrics per seed, overall and on the
held-out / seen edit types; per fraction the stage-1 gain with a scene-root bootstrap and a seed t-interval),
``data_efficiency.md``, ``data_efficiency.png``; per seed ``seed<k>/pretrain/stage{0,1}`` and ``seed<k>/f<pct>-<arm>/stage2``.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from detailfusion.library.errors import ConfigError
from detailfusion.library.eval.outcomes import METRICS, Outcomes
from detailfusion.platform.ablate import CONFIGS, _summary
from detailfusion.platform.data.benchmark import TEST_QUERIES, TRAIN_QUERIES, cirr_options

HELD_OUT_TYPES = ("move", "resize", "texture", "rotation")  # absent from stage 2's train split, taught by stage 1
FRACTIONS = (0.1, 0.25, 1.0)
ARMS = ("stage1", "no_stage1")  # stage 2 from stage 1's export / from stage 0's
STAGE2_EPOCHS = 4  # at 100 %: stage2_tiny.yaml's; a fraction f trains round(4 / f) epochs (the same steps)


@dataclass(frozen=True)
class DataEfficiencyConfig:
    workdir: str
    seeds: int = 3
    first_seed: int = 0
    fractions: tuple[float, ...] = FRACTIONS
    cirr_pairs: int = TRAIN_QUERIES  # benchmark v2's train queries (stage 2 at 100 %)
    test_pairs: int = TEST_QUERIES
    ipr2pr_pairs: int | None = None  # stage 1's corpus; None: 10x stage 2's queries (cirr_pairs)
    stage0_pairs: int = 2000  # stage 0's share of it (its first rows)
    stage1_epochs: int = 1
    held_out_types: tuple[str, ...] = HELD_OUT_TYPES
    data_seed: int = 0
    overrides: tuple[str, ...] = ()  # --set key=value for every stage
    bootstrap: int = 2000
    num_cpus: int | None = None
    configs: str = str(CONFIGS)

    def __post_init__(self):
        if self.ipr2pr_pairs is None:
            object.__setattr__(self, "ipr2pr_pairs", 10 * self.cirr_pairs)
        if not self.fractions or any(not 0 < f <= 1 for f in self.fractions):
            raise ConfigError(f"fractions must be in (0, 1], got {self.fractions}")
        if self.seeds < 1:
            raise ConfigError(f"--seeds must be at least 1, got {self.seeds}")
        if not 0 < self.stage0_pairs <= self.ipr2pr_pairs:
            raise ConfigError(f"stage0_pairs must be in 1..ipr2pr_pairs ({self.ipr2pr_pairs}), got {self.stage0_pairs}")


def in_fraction(scene_root: int, fraction: float) -> bool:
    """Whether a scene root is among a stable ``fraction`` of roots (nested: a root in 10 % is in 25 %)."""
    digest = hashlib.sha1(f"data-efficiency/{scene_root}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def train_subset(root: Path, fraction: float, out: Path) -> Path:
    """A CIRR-format root holding the train queries of ``fraction`` of the scene roots of ``root`` (and their images,
    linked, not copied); its other splits are left out. Reused when written for the same root and fraction."""
    marker = out / "synthetic" / "subset.json"
    made = {"parent": str(root), "fraction": fraction}
    if marker.is_file() and json.loads(marker.read_text()) == made:
        return out
    source = root / "captions" / "cap.rc2.train.json"
    captions = json.loads(source.read_text())
    untagged = next((c.get("pairid") for c in captions if "scene_root" not in c), None)
    if untagged is not None:
        raise ConfigError(f"{source}: pairid {untagged} has no scene_root; fractions keep whole scene roots of a "
                          "benchmark v2 (synth --kind detail)")
    kept = [c for c in captions if in_fraction(c["scene_root"], fraction)]
    if not kept:
        raise ConfigError(f"fraction {fraction} of {root}'s train split keeps no scene root: use a larger fraction")
    roots = {c["scene_root"] for c in kept}
    images = json.loads((root / "image_splits" / "split.rc2.train.json").read_text())
    kept_images = {name: path for name, path in images.items() if int(name.split("-")[1]) in roots}
    for folder in ("captions", "image_splits", "synthetic"):
        (out / folder).mkdir(parents=True, exist_ok=True)
    (out / "captions" / "cap.rc2.train.json").write_text(json.dumps(kept))
    (out / "image_splits" / "split.rc2.train.json").write_text(json.dumps(kept_images))
    if not (out / "train").exists():
        (out / "train").symlink_to((root / "train").resolve(), target_is_directory=True)
    marker.write_text(json.dumps(made))
    print(f"data-efficiency: {fraction:.0%} of the train split: {len(kept)} queries, {len(roots)} scene roots, "
          f"{len(kept_images)} images", flush=True)
    return out


def prepare_study(config: DataEfficiencyConfig) -> dict:
    """Write and prepare the benchmark (held-out types), stage 1's corpus, stage 0's share and each fraction's train
    subset; returns {"root", "manifest", "stage0", "stage1", "test1", fraction: prepared train dir}."""
    from detailfusion.library.config import PrepareConfig
    from detailfusion.platform.data.benchmark import _written
    from detailfusion.platform.data.prepare import prepare

    base = Path(config.workdir) / "benchmark"
    root = _written(base / "data" / "cirr", "detail", {**cirr_options(config.cirr_pairs, config.test_pairs,
                                                                       config.data_seed),
                                                        "held_out_types": list(config.held_out_types)})
    corpus = {"seed": config.data_seed, "exclude_from": str(root)}
    stage1 = _written(base / "data" / "ipr2pr", "ipr2pr-detail", {"pairs": config.ipr2pr_pairs, **corpus})
    stage0 = _written(base / "data" / "ipr2pr-stage0", "ipr2pr-detail", {"pairs": config.stage0_pairs, **corpus})
    found = {"root": root, "manifest": json.loads((root / "synthetic" / "manifest.json").read_text())}

    def prepared(name: str, dataset: str, source: Path, split: str) -> Path:
        out = base / "prep" / name
        prepare(PrepareConfig(dataset=dataset, root=str(source), split=split, out=str(out), preset="tiny",
                              num_cpus=config.num_cpus))
        return out

    found["stage0"] = prepared("ipr2pr-stage0", "ipr2pr", stage0, "train")
    found["stage1"] = prepared("ipr2pr-train", "ipr2pr", stage1, "train")
    found["test1"] = prepared("cirr-test1", "cirr", root, "test1")
    for fraction in config.fractions:
        source = root if fraction == 1 else train_subset(root, fraction, base / "data" / f"cirr-{_pct(fraction)}")
        found[fraction] = prepared(f"cirr-train-{_pct(fraction)}", "cirr", source, "train")
    return found


def _pct(fraction: float) -> str:
    return f"{round(100 * fraction)}pct"


def _stage(config: DataEfficiencyConfig, seed: int, run: str, stage: int, prepared: Path, init_from: Path | None,
           extra: tuple[str, ...] = ()) -> Path:
    from detailfusion.library.config import JobConfig, load_config
    from detailfusion.platform.train.run import run_stage

    work = Path(config.workdir) / f"seed{seed}" / run
    store = f"sqlite:///{Path(config.workdir).resolve() / 'mlflow.db'}"
    items = [f"workdir={work}", f"name=data-efficiency-{run}-seed{seed}", f"data.prepared={prepared}",
             f"train.seed={seed}", f"tracking.uri={store}", *([f"model.init_from={init_from}"] if init_from else []),
             *extra, *config.overrides]
    return run_stage(load_config(JobConfig, Path(config.configs) / f"stage{stage}_tiny.yaml", items))


def run_data_efficiency(config: DataEfficiencyConfig) -> dict:
    """Train and score every (seed, fraction, arm) (reusing what is done); write and return data_efficiency.json's
    content."""
    from detailfusion.library.eval.claims import query_set
    from detailfusion.platform.data.benchmark import labelled_test1
    from detailfusion.platform.eval.model_outcomes import model_outcomes
    from detailfusion.platform.ray_setup import init_ray

    work = Path(config.workdir).resolve()
    config = replace(config, workdir=str(work))
    started = time.perf_counter()
    init_ray(config.num_cpus)
    data = prepare_study(config)
    targets, tags = labelled_test1({"root": data["root"]})
    seeds = list(range(config.first_seed, config.first_seed + config.seeds))
    outcomes: dict[str, list[Outcomes]] = {}
    runs = len(seeds) * len(config.fractions) * len(ARMS)
    done = 0
    for seed in seeds:
        stage0 = _stage(config, seed, "pretrain", 0, data["stage0"], None)
        stage1 = _stage(config, seed, "pretrain", 1, data["stage1"], stage0, (f"train.epochs={config.stage1_epochs}",))
        for fraction in config.fractions:
            for arm in ARMS:
                done += 1
                name = f"f{_pct(fraction)}-{arm}"
                print(f"\n[data-efficiency {done}/{runs}] seed {seed}: stage 2 on {fraction:.0%} of its rows, "
                      f"{'from stage 1' if arm == 'stage1' else 'without stage 1'}", flush=True)
                epochs = max(1, round(STAGE2_EPOCHS / fraction))
                model = _stage(config, seed, name, 2, data[fraction], stage1 if arm == "stage1" else stage0,
                               (f"train.epochs={epochs}",))
                outcomes.setdefault(name, []).append(model_outcomes(work / f"seed{seed}" / name / "outcomes.npz",
                                                                    model, data["test1"], targets, ["gm", "di"]))
    queries = query_set(outcomes[next(iter(outcomes))][0].sample_ids, tags)
    result = summarise(config, outcomes, queries, data["manifest"])
    result["seconds"] = round(time.perf_counter() - started, 1)
    (work / "data_efficiency.json").write_text(json.dumps(result, indent=1))
    plot = _plot(work / "data_efficiency.png", result)
    (work / "data_efficiency.md").write_text(markdown(result, plot))
    print(f"\n[data-efficiency] finished in {result['seconds']:.0f} s: {work / 'data_efficiency.md'}", flush=True)
    return result


def summarise(config: DataEfficiencyConfig, outcomes: dict[str, list[Outcomes]], queries, manifest: dict) -> dict:
    """Per fraction and arm, DI's and GM's metrics (mean, seed std, per seed) on all queries and on the held-out /
    seen edit types; per fraction, DI's stage-1 gain on Avg with both intervals (eval/claims.py's judge, bar 0)."""
    from detailfusion.library.eval.claims import QuerySet, _compare
    from detailfusion.library.eval.statistics import MIN_SEEDS

    groups = ["held_out" if t in config.held_out_types else "seen" for t in queries.edit_types]
    by_types = QuerySet(queries.clusters, queries.cluster_kind, queries.edit_types, groups)
    rows, gains = [], []
    for fraction in config.fractions:
        for arm in ARMS:
            runs = outcomes[f"f{_pct(fraction)}-{arm}"]
            row = {"fraction": fraction, "arm": arm}
            for variant in ("di", "gm"):
                for group in (None, "held_out", "seen"):
                    mask = np.array([g == group for g in groups]) if group else np.ones(len(groups), bool)
                    per_seed = {m: [float(o.values[variant][m][mask].mean()) for o in runs] for m in METRICS}
                    row[f"{variant}/{group or 'all'}"] = _summary(per_seed)
            rows.append(row)
        a, b = (f"f{_pct(fraction)}-stage1", "di"), (f"f{_pct(fraction)}-no_stage1", "di")
        for group in (None, "held_out"):
            rule = f"stage 1 helps DI at {fraction:.0%} ({group or 'all'} queries, Avg)"
            gain = _compare(outcomes, rule, a, b, "Avg", 0.0, by_types, config.bootstrap, MIN_SEEDS, family=group)
            gains.append({"fraction": fraction, "queries": group or "all", **gain})
    return {"preset": "tiny", "seeds": list(range(config.first_seed, config.first_seed + config.seeds)),
            "fractions": list(config.fractions), "held_out_types": list(config.held_out_types),
            "stage1_pairs": config.ipr2pr_pairs, "stage1_epochs": config.stage1_epochs,
            "stage2_train_queries": config.cirr_pairs, "benchmark": manifest, "queries": len(groups),
            "held_out_queries": groups.count("held_out"), "clusters": queries.cluster_kind,
            "bootstrap": config.bootstrap, "rows": rows, "gains": gains}


def markdown(result: dict, plot: str | None = None) -> str:
    seeds = len(result["seeds"])
    lines = ["# Data efficiency: does stage 1 pay off? (tiny preset, benchmark v2)", "",
             f"Stage 2 on a fraction of its {result['stage2_train_queries']:,} train queries (whole scene roots; the "
             f"same optimizer steps at every fraction), from stage 1's export or from stage 0's. Stage 1: "
             f"{result['stage1_pairs']:,} synthetic IPr2Pr pairs, {result['stage1_epochs']} epoch(s), every edit type; "
             f"held out of stage 2's train split: {', '.join(result['held_out_types'])} "
             f"({result['held_out_queries']} of {result['queries']} test1 queries). {seeds} seed(s) "
             f"{result['seeds']}; mean ± seed std.", "",
             "| stage 2 rows | arm | DI Avg | DI Avg (held-out types) | DI Rs@1 | DI R@5 | GM Avg |",
             "|---:|---|---:|---:|---:|---:|---:|"]
    cell = lambda row, key, m: f"{row[key]['mean'][m]:.2f} ± {row[key]['std'][m]:.2f}"  # noqa: E731
    for row in result["rows"]:
        lines.append(f"| {row['fraction']:.0%} | {row['arm']} | {cell(row, 'di/all', 'Avg')} | "
                     f"{cell(row, 'di/held_out', 'Avg')} | {cell(row, 'di/all', 'Rs@1')} | {cell(row, 'di/all', 'R@5')} "
                     f"| {cell(row, 'gm/all', 'Avg')} |")
    lines += ["", "## Stage 1's gain on DI (Avg, with minus without)", "",
              f"95 % intervals: bootstrap over {result['clusters']} clusters and a t-interval over seeds.", "",
              "| stage 2 rows | queries | gain | bootstrap | seeds | per seed | verdict |",
              "|---:|---|---:|---|---|---|---|"]
    fmt = lambda iv: f"[{iv[0]:+.2f}, {iv[1]:+.2f}]" if iv else "n/a"  # noqa: E731
    for gain in result["gains"]:
        per = ", ".join(f"{x:+.2f}" for x in gain["per_seed"])
        lines.append(f"| {gain['fraction']:.0%} | {gain['queries']} | {gain['difference']:+.2f} | "
                     f"{fmt(gain['interval_95'])} | {fmt(gain['seed_interval_95'])} | {per} | {gain['verdict']} "
                     f"({gain['seed_level']}) |")
    if plot:
        lines += ["", f"![DI Avg against stage 2's rows]({plot})"]
    if result.get("seconds"):
        lines += ["", f"Wall time: {result['seconds']:.0f} s."]
    if result.get("note"):
        lines += ["", result["note"]]
    return "\n".join(lines) + "\n"


def _plot(path: Path, result: dict) -> str | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8), dpi=100, sharey=True)
    for ax, key, title in ((axes[0], "di/all", "all test1 queries"), (axes[1], "di/held_out", "held-out edit types")):
        for arm, style in zip(ARMS, ("o-", "s--")):
            rows = [r for r in result["rows"] if r["arm"] == arm]
            ax.errorbar([100 * r["fraction"] for r in rows], [r[key]["mean"]["Avg"] for r in rows],
                        yerr=[r[key]["std"]["Avg"] for r in rows], fmt=style, capsize=3,
                        label="from stage 1" if arm == "stage1" else "without stage 1")
        ax.set_xscale("log")
        ax.set_xticks([100 * f for f in result["fractions"]], [f"{f:.0%}" for f in result["fractions"]])
        ax.set_xlabel("stage 2's train rows")
        ax.set_title(f"DI, {title}")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("Avg (%)")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path.name
