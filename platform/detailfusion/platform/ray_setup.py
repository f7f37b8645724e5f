"""Connect to Ray the same way from a laptop, a test and ``ray job submit``; stop the same way on Ctrl-C and SIGTERM."""

from __future__ import annotations

import os
import signal
import threading


def init_ray(num_cpus: int | None = None, object_store_mb: int | None = None, dashboard: bool = False) -> None:
    """Join the running cluster (``RAY_ADDRESS``, set by ``ray job submit``) or start a local Ray; then SIGTERM stops
    the driver as Ctrl-C does (``stop_on_sigterm``).

    A local Ray gets explicit CPUs (small machines starve otherwise) and, when given, a small object store.
    ``dashboard``: also start the dashboard, whose state API Ray Train needs to free the resources of a run that
    was killed from outside (a sweep trial stopped early). On a joined cluster the job's workers get its address as
    ``RAY_ADDRESS``: Train's detached placement-group cleaner of a sweep trial watches its run through the state
    API, which without it fails where a machine runs two Rays, and then lives on after its job. Does nothing when Ray
    is already initialised in this process (tests start it themselves).
    """
    import ray

    if ray.is_initialized():
        return
    if address := os.environ.get("RAY_ADDRESS"):
        workers = {} if address.startswith("ray://") else {"runtime_env": {"env_vars": {"RAY_ADDRESS": address}}}
        ray.init(address=address, **workers)  # (a Ray Client's workers are on the cluster, where it is found)
    else:
        kwargs = {"num_cpus": num_cpus or os.cpu_count(), "include_dashboard": dashboard}
        if object_store_mb:
            kwargs["object_store_memory"] = object_store_mb * 1024 * 1024
        ray.init(address="local", **kwargs)
    stop_on_sigterm()


def stop_on_sigterm() -> None:
    """SIGTERM (``kill``, a scheduler's stop, ``ray job stop``) does what Ctrl-C does at that moment: the SIGINT
    handler in force then (Ray Train's: abort the run, freeing its workers and placement group; Ray Tune's: stop
    the trials and save the sweep's state), else a KeyboardInterrupt. Replaces ``ray.init``'s own handler, which
    raises SystemExit wherever the driver is: past Tune's stop (no trial stopped, no state saved at the stop) and
    Train's abort, leaving the run to the cluster's clean-up of a dead job (which spares the detached actors a run
    made). Only from the main thread, where Python handles signals."""
    if threading.current_thread() is not threading.main_thread():
        return

    def as_ctrl_c(signum, frame):
        handler = signal.getsignal(signal.SIGINT)
        if not callable(handler):  # SIG_DFL / SIG_IGN set by someone else: still stop, as Python's own Ctrl-C would
            raise KeyboardInterrupt
        try:
            handler(signal.SIGINT, frame)
        except SystemExit as exc:  # Train's handler exits 0 once the run is aborted: a stopped job did not succeed
            if not exc.code:
                raise KeyboardInterrupt from None
            raise

    signal.signal(signal.SIGTERM, as_ctrl_c)
