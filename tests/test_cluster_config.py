"""cluster.yaml passes Ray's own cluster-launcher schema offline, and the GPU job configs fit its node types."""

from pathlib import Path

import pytest
import yaml
from conftest import globbed

from detailfusion.library.config import EvalConfig, JobConfig, ServeConfig, load_config

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster.yaml"


@pytest.fixture(scope="module")
def cluster() -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(yaml.safe_load(CLUSTER.read_text()))
    validate_config(config)  # raises on anything Ray's schema refuses
    return config


def gpu_types(cluster: dict) -> dict[str, dict]:
    return {name: t for name, t in cluster["available_node_types"].items() if t["resources"].get("GPU", 0) > 0}


def test_cluster_yaml_is_valid_and_the_head_has_no_gpu(cluster):
    head = cluster["available_node_types"][cluster["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and head["resources"]["CPU"] > 0
    assert cluster["idle_timeout_minutes"] > 0 and gpu_types(cluster)
    assert any("pip install" in c and "detailfusion" in c for c in cluster["setup_commands"])


@pytest.mark.parametrize("path", globbed(REPO / "jobs/configs", "stage*_blip2*.yaml"), ids=lambda p: p.name)
def test_training_configs_fit_a_gpu_node_type(cluster, path):
    train = load_config(JobConfig, path).train
    assert train.use_gpu
    fitting = {n: t for n, t in gpu_types(cluster).items()
               if t["resources"]["CPU"] / t["resources"]["GPU"] >= train.cpus_per_worker}
    assert fitting, f"{path.name}: no GPU node type gives {train.cpus_per_worker} CPUs per GPU"
    gpus = sum(t["resources"]["GPU"] * t.get("max_workers", 0) for t in fitting.values())
    assert gpus >= train.num_workers, f"{path.name}: {train.num_workers} GPU workers, the cluster can hold {gpus}"


def test_serving_and_encoding_fit_a_single_gpu_type(cluster):
    serve = ServeConfig(use_gpu=True)
    single = [t for t in gpu_types(cluster).values() if t["resources"]["GPU"] == 1]
    assert single and all(t["resources"]["CPU"] >= serve.replica_cpus for t in single)
    assert sum(t.get("max_workers", 0) for t in single) >= serve.max_replicas
    for config in (load_config(EvalConfig, p) for p in (REPO / "jobs/configs").glob("eval_*.yaml")):
        assert config.cpus_per_actor <= max(t["resources"]["CPU"] for t in gpu_types(cluster).values())
