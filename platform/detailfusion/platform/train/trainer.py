"""The stage's Ray Train trainer: ``TorchTrainer`` without the per-run actors a stage does not use.

Every ``fit()`` starts fresh processes, and on a small machine each costs start-up (measured on 2 cores, one worker,
an empty training function: 5.8-7.2 s to its first line with Train's default callbacks, 4.6-6.1 s without the two
below, and about 1 s less to return). Two of Train's default controller callbacks start an actor that a stage may
not need:

- ``DatasetsCallback`` starts a ``DatasetManager`` actor even when the run has no Ray Datasets (a split held in
  the object store, which is how every gallery split and small inline split trains): dropped when ``datasets`` is
  empty.
- ``PlacementGroupCleanerCallback`` starts a detached actor that frees the run's placement group when its controller
  is killed from outside, as Ray Tune does to a trial it stops early. A stage run by its own driver (a job, the
  pipeline, the ablation) ends with its driver, placement group included: ``pg_cleaner=False`` drops it there;
  sweep trials keep it.

Ray is pinned (``pyproject.toml``), and ``tests/test_training.py`` checks that the callbacks named here exist and
are the ones dropped, so a Ray upgrade that renames them fails a test instead of silently starting them again.
"""

from __future__ import annotations

from ray.train.torch import TorchTrainer
from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback


class StageTrainer(TorchTrainer):
    def __init__(self, *args, pg_cleaner: bool = True, **kwargs):
        self.pg_cleaner = pg_cleaner
        super().__init__(*args, **kwargs)

    def unused_callback_types(self) -> tuple[type, ...]:
        return ((() if self.datasets else (DatasetsCallback,))
                + (() if self.pg_cleaner else (PlacementGroupCleanerCallback,)))

    def _create_default_callbacks(self) -> list:
        unused = self.unused_callback_types()
        return [callback for callback in super()._create_default_callbacks() if not isinstance(callback, unused)]
