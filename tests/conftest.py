import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def globbed(folder: Path, pattern: str) -> list[Path]:
    """The sorted matches of ``pattern`` under ``folder`` for a parametrisation; an error at collection when there are
    none, so that a moved folder or renamed files fail the run instead of collecting nothing."""
    found = sorted(Path(folder).glob(pattern))
    if not found:
        raise FileNotFoundError(f"{folder}/{pattern} matches no file: the parametrisation built from it would collect "
                                "no test")
    return found


def missing_prerequisite(reason: str) -> None:
    """Skip a test whose prerequisite this machine lacks; under CI (``CI=true``) fail with the reason instead, so a
    clean-clone run never passes by skipping what it was meant to run."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI must run this test: {reason}", pytrace=False)
    pytest.skip(reason)


def find_shared_datasets() -> Path | None:
    """The real CIRR / FashionIQ val annotations: $DETAILFUSION_SHARED_DATASETS, else ../shared/datasets beside the
    checkout (the only two places .ci/run looks)."""
    for candidate in (os.environ.get("DETAILFUSION_SHARED_DATASETS"), REPO.parent / "shared" / "datasets"):
        if candidate and (Path(candidate) / "cirr" / "captions" / "cap.rc2.val.json").is_file():
            return Path(candidate)
    return None


@pytest.fixture(scope="session")
def shared_datasets() -> Path:
    found = find_shared_datasets()
    if found is None:
        missing_prerequisite("real CIRR/FashionIQ val annotations not found: set DETAILFUSION_SHARED_DATASETS to "
                             "a shared/datasets folder (cirr/, fashioniq/)")
    return found


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny():
    """A tiny model (eval mode) and its tokenizer, built once per session; tests must not train it in place."""
    import torch

    from detailfusion.library.model import build_model

    torch.manual_seed(0)
    model, tokenizer = build_model("tiny")
    return model.eval(), tokenizer


@pytest.fixture(scope="session", autouse=True)
def mlflow_store(tmp_path_factory):
    """One MLflow store for the session's runs (MLflow's own MLFLOW_TRACKING_URI), made once: a store per test
    workdir would build its SQLite schema each time (about 1.5 s). Tests of the default stores unset it."""
    import os

    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    yield uri
    if previous is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = previous


@pytest.fixture(scope="session")
def ray_local(tmp_path_factory):
    """One local Ray for the whole session: 2 CPUs, a small object store, and the dashboard (Ray Train frees the
    resources of a run killed from outside, e.g. a sweep trial stopped early, through its state API)."""
    import ray

    if not ray.is_initialized():
        ray.init(
            address="local",
            num_cpus=2,
            object_store_memory=256 * 1024 * 1024,
            include_dashboard=True,
            _temp_dir=str(tmp_path_factory.mktemp("ray")),
            log_to_driver=False,
            # workers import train loops defined in test modules
            runtime_env={"env_vars": {"PYTHONPATH": str(REPO / "tests"), "TOKENIZERS_PARALLELISM": "false"}},
        )
    yield ray


@pytest.fixture(scope="session")
def stage2_data(tmp_path_factory, ray_local):
    """A random tiny model, a feature-cached synthetic CIRR train split and stage 2 overrides over them (the sweep
    and interrupt tests), made once: (root, ["key=value", ...]).

    Trials validate on the training split itself: with a few dozen steps that is where a working learning rate
    and a negligible one differ clearly, which makes ASHA's decisions in the sweep test deterministic."""
    import torch

    from detailfusion.library.config import PrepareConfig
    from detailfusion.library.data.synthetic import write_synthetic
    from detailfusion.library.model import build_model, save_model
    from detailfusion.platform.data.prepare import prepare

    root = tmp_path_factory.mktemp("stage2")
    torch.manual_seed(0)
    model, tokenizer = build_model("tiny")
    save_model(model, tokenizer, root / "init")
    write_synthetic("cirr", root / "raw", pairs=400, seed=5, image_size=64)
    prepare(PrepareConfig(dataset="cirr", root=str(root / "raw"), split="train", out=str(root / "prep"),
                          cache_vision_features=True, model=str(root / "init")))
    overrides = [f"workdir={root}", f"data.prepared={root / 'prep'}", f"model.init_from={root / 'init'}",
                 f"data.val_prepared={root / 'prep'}", "train.log_every=100",
                 "data.holdout_fraction=0"]  # trials train on every row of the split they validate on
    return root, overrides


def registered_checkpoint_step(snapshot: Path) -> int | None:
    """The step of the latest checkpoint Ray Train has registered (its checkpoint_manager_snapshot.json), or None:
    registered, not merely written, so a run stopped now resumes from it."""
    import json

    try:
        latest = json.loads(snapshot.read_text()).get("latest_checkpoint_result")
    except (OSError, ValueError):
        return None
    return latest["metrics"]["step"] if latest else None


def all_cpus_free(ray, timeout_s: float) -> bool:
    """Wait up to ``timeout_s`` until every CPU of the running Ray is available again; whether they are."""
    import time

    total, deadline = ray.cluster_resources().get("CPU", 0), time.monotonic() + timeout_s
    while ray.available_resources().get("CPU", 0) < total and time.monotonic() < deadline:
        time.sleep(1)
    return ray.available_resources().get("CPU", 0) >= total


@pytest.fixture(scope="module", autouse=True)
def ray_resources_returned(request):
    """After each module, the session Ray must get all its CPUs back within a minute: a run, actor pool or
    placement group left behind would starve the next module's Ray Data tasks, which then wait for ever (a CI run
    hung 3 x 900 s that way). Fails here, naming what still holds resources, instead."""
    yield
    import sys

    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return
    total = ray.cluster_resources().get("CPU", 0)
    if not all_cpus_free(ray, 60):
        free = ray.available_resources().get("CPU", 0)
        from ray.util.state import list_actors, list_placement_groups

        actors = [f"{a.class_name} ({a.pid})" for a in list_actors(filters=[("state", "=", "ALIVE")])]
        groups = [g.placement_group_id for g in list_placement_groups(filters=[("state", "=", "CREATED")])]
        pytest.fail(f"{request.module.__name__} left {total - free} of {total} CPUs held after 60 s: alive actors "
                    f"{actors}, placement groups {groups}", pytrace=False)


@pytest.fixture(scope="module")
def one_faiss_thread():
    """FAISS's OpenMP threads only contend on the tests' small indexes (k-means on a loaded 2-core machine: 3x
    slower with 2 threads)."""
    import faiss

    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(threads)
