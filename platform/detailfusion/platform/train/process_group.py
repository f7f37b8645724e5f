"""The stage's torch.distributed process group, set up by Ray Train's backend hook without torch in Train's controller.

Ray Train's ``TorchConfig`` lives in ``ray.train.torch``, whose import loads torch, and Train's controller process
unpickles it: 1.2-2.5 s of every stage's start-up on a 2-core machine (measured: a one-worker run of an empty
training function reached its first line in 6.8-8.3 s with ``TorchConfig``, 5.6-5.8 s with this config). This
``BackendConfig`` does the same work on the workers (TCP rendezvous on rank 0's address, the torchrun environment
variables DeepSpeed reads, the group destroyed at shut-down) from a module that imports torch only inside the
functions the workers run.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ray.train.backend import Backend, BackendConfig

SHUTDOWN_TIMEOUT_S = 30


def rendezvous_address() -> tuple[str, int]:
    """Rank 0's node address and a free TCP port on it (runs on rank 0)."""
    import socket

    import ray

    with socket.socket() as probe:
        probe.bind(("", 0))
        port = probe.getsockname()[1]
    return ray.util.get_node_ip_address(), port


def join_group(backend: str, url: str, timeout_s: int) -> None:
    """One worker: the torchrun environment (RANK, LOCAL_RANK, WORLD_SIZE, ...) and ``init_process_group``."""
    import datetime

    import ray.train
    import torch.distributed as dist

    context = ray.train.get_context()
    os.environ.update({
        "RANK": str(context.get_world_rank()), "WORLD_SIZE": str(context.get_world_size()),
        "LOCAL_RANK": str(context.get_local_rank()), "LOCAL_WORLD_SIZE": str(context.get_local_world_size()),
        "NODE_RANK": str(context.get_node_rank()),
    })
    dist.init_process_group(backend, init_method=url, rank=context.get_world_rank(),
                            world_size=context.get_world_size(), timeout=datetime.timedelta(seconds=timeout_s))


def leave_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


class ProcessGroupBackend(Backend):
    def on_start(self, worker_group, backend_config: ProcessGroupConfig) -> None:
        address, port = worker_group.execute_single(0, rendezvous_address)
        host = f"[{address}]" if ":" in address else address  # an IPv6 address in a URL
        worker_group.execute(join_group, backend=backend_config.backend, url=f"tcp://{host}:{port}",
                             timeout_s=backend_config.timeout_s)

    def on_shutdown(self, worker_group, backend_config: ProcessGroupConfig) -> None:
        import ray

        try:  # a dead worker has nothing to leave; the run's own error (if any) is the one that matters
            ray.get(worker_group.execute_async(leave_group), timeout=SHUTDOWN_TIMEOUT_S)
        except Exception as exc:  # noqa: BLE001
            print(f"process group shut-down: {type(exc).__name__}: {exc}", flush=True)


@dataclass
class ProcessGroupConfig(BackendConfig):
    """``backend``: "gloo" (CPU) or "nccl" (GPU); ``timeout_s``: collectives' timeout (torch's default: 30 min)."""

    backend: str = "gloo"
    timeout_s: int = 1800

    @property
    def backend_cls(self):
        return ProcessGroupBackend
