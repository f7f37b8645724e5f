"""``detailfusion serve``: start (or join) Ray, run the app behind Serve's HTTP proxy, block until Ctrl-C."""

from __future__ import annotations

import time

from detailfusion.library.config import ServeConfig


def start(config: ServeConfig, name: str = "detailfusion"):
    """Deploy the app on ``config.host:config.port``; returns its handle (the caller keeps Ray running)."""
    from ray import serve

    from detailfusion.platform.ray_setup import init_ray
    from detailfusion.platform.serving.app import build_app, check_placement

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

