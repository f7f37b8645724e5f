"""Connect to Ray the same way from a laptop, a test and ``ray job submit``."""

from __future__ import annotations

import os


def init_ray(num_cpus: int | None = None, object_store_mb: int | None = None, dashboard: bool = False) -> None:
    """Join the running cluster (``RAY_ADDRESS``, set by ``ray job submit``) or start a local Ray.

    A local Ray gets explicit CPUs (small machines starve otherwise) and, when given, a small object store.
    ``dashboard``: also start the dashboard, whose state API Ray Train needs to free the resources of a run that
    was killed from outside (a sweep trial stopped early). Does nothing when Ray is already initialised in this
    process (tests start it themselves).
    """
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"])
        return
    kwargs = {"num_cpus": num_cpus or os.cpu_count(), "include_dashboard": dashboard}
    if object_store_mb:
        kwargs["object_store_memory"] = object_store_mb * 1024 * 1024
    ray.init(address="local", **kwargs)
