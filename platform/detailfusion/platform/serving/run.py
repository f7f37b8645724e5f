"""``detailfusion serve``: start (or join) Ray, run the app behind Serve's HTTP proxy, block until Ctrl-C."""

from __future__ import annotations

import time

from detailfusion.library.config import ServeConfig


def start(config: ServeConfig, name: str = "detailfusion"):
    """Deploy the app on ``config.host:config.port``; returns its handle (the caller keeps Ray running)."""
    from ray import serve

    from detailfusion.platform.ray_setup import init_ray
    from detailfusion.platform.serving.app import build_app

    app = build_app(config)  # checks the paths before Ray starts
    init_ray(config.num_cpus, dashboard=True)  # Serve's autoscaler and state API
    check_placement(config)
    serve.start(http_options={"host": config.host, "port": config.port})
    return serve.run(app, name=name, route_prefix="/")


def serve_forever(config: ServeConfig) -> None:
    from ray import serve

    start(config)
    print(f"[serve] http://{config.host}:{config.port}/  (POST /search, GET /healthz; Ctrl-C stops)", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()


def check_placement(config: ServeConfig) -> None:
    """Refuse node resources (``model_node``, ``shard_nodes``) that no node of the running Ray offers: their replicas
    would wait for a node for ever."""
    import ray

    from detailfusion.library.config import ConfigError

    offered = ray.cluster_resources()
    wanted = {f"shard_nodes[{i}]": name for i, name in enumerate(config.shard_nodes)}
    if config.model_node:
        wanted["model_node"] = config.model_node
    missing = {key: name for key, name in wanted.items() if name not in offered}
    if missing:
        custom = sorted(r for r in offered if r not in ("CPU", "GPU", "memory", "object_store_memory")
                        and not r.startswith("node:") and not r.startswith("accelerator_type:"))
        raise ConfigError(f"serve: no node offers {', '.join(f'{k}={v!r}' for k, v in missing.items())} "
                          f"(custom node resources here: {', '.join(custom) or 'none'}; give them with "
                          "`ray start --resources` or cluster.yaml's resources:)")
