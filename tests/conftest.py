import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def find_shared_datasets() -> Path | None:
    """The real CIRR / FashionIQ val annotations: $DETAILFUSION_SHARED_DATASETS, ../shared/datasets beside the
    checkout, or this workplace's /work/shared/datasets (a clean clone elsewhere still finds it)."""
    candidates = [os.environ.get("DETAILFUSION_SHARED_DATASETS"), REPO.parent / "shared" / "datasets",
                  "/work/shared/datasets"]
    for candidate in candidates:
        if candidate and (Path(candidate) / "cirr" / "captions" / "cap.rc2.val.json").is_file():
            return Path(candidate)
    return None


@pytest.fixture(scope="session")
def shared_datasets() -> Path:
    found = find_shared_datasets()
    if found is None:
        pytest.skip("real CIRR/FashionIQ val annotations not found: set DETAILFUSION_SHARED_DATASETS to shared/datasets")
    return found

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny():
    """A tiny model (eval mode) and its tokenizer, built once per session; tests must not train it in place."""
    import torch

    from detailfusion.model import build_model

    torch.manual_seed(0)
    model, tokenizer = build_model("tiny")
    return model.eval(), tokenizer


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
