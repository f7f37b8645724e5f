"""Fault injection for tests, through the environment: no production config key, no test code in the loop.

A test sets ``DETAILFUSION_INJECT_FAULT="step=7"`` (optionally ``",rank=1"``) in the driver's environment before
``run_stage``; the stage hands the variable to its training workers (``worker_env``), and the worker whose rank
matches raises once when it reaches that step (``FaultPlan.maybe_fail``). "Once" is per stage directory: the first
fault writes ``fault_injected`` there, so Ray Train's restart, or the same command rerun, goes past it.

``DETAILFUSION_DETERMINISTIC=1`` (the resume tests) makes the workers use deterministic kernels
(``torch.use_deterministic_algorithms``), so two runs of one seed can be compared step by step.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from detailfusion.library.errors import ConfigError

FAULT_ENV = "DETAILFUSION_INJECT_FAULT"
DETERMINISTIC_ENV = "DETAILFUSION_DETERMINISTIC"
MARKER = "fault_injected"


@dataclass(frozen=True)
class FaultPlan:
    step: int
    rank: int = 0

    @classmethod
    def parse(cls, text: str) -> FaultPlan:
        """``"step=N[,rank=R]"`` -> plan; anything else is refused naming the variable."""
        try:
            fields = dict(part.split("=", 1) for part in text.replace(" ", "").split(",") if part)
            plan = cls(step=int(fields.pop("step")), rank=int(fields.pop("rank", 0)))
        except (KeyError, ValueError) as exc:
            raise ConfigError(f"{FAULT_ENV}={text!r}: expected 'step=N' or 'step=N,rank=R'") from exc
        if fields:
            raise ConfigError(f"{FAULT_ENV}={text!r}: unknown field(s) {sorted(fields)}")
        return plan

    def maybe_fail(self, step: int, rank: int, stage_dir: Path) -> None:
        marker = Path(stage_dir) / MARKER
        if step == self.step and rank == self.rank and not marker.exists():
            marker.write_text(f"rank {rank} step {step}\n")
            raise RuntimeError(f"injected fault at step {step} on rank {rank}")


def planned() -> FaultPlan | None:
    """The plan in this process's environment (None: no fault)."""
    text = os.environ.get(FAULT_ENV)
    return FaultPlan.parse(text) if text else None


def deterministic() -> bool:
    """Whether this process's environment asks for deterministic kernels."""
    return os.environ.get(DETERMINISTIC_ENV, "") not in ("", "0")


def worker_env() -> dict:
    """The training workers' runtime environment carrying the driver's plan (checked here, before any worker
    starts) and its determinism switch; {} without either."""
    plan, env = planned(), {}
    if plan:
        env[FAULT_ENV] = f"step={plan.step},rank={plan.rank}"
    if deterministic():
        env[DETERMINISTIC_ENV] = "1"
    return {"env_vars": env} if env else {}
