"""The platform layer: the library run on Ray (Data, Train with DeepSpeed, Tune, Serve) and tracked with MLflow.

- ``cli``: the ``detailfusion`` front door; ``jobs/*.py`` at the repository's root call it for ``ray job submit``.
- ``data/``: prepare (Ray Data read, validate, decode -> canonical parquet), training input, feature cache.
- ``train/``: the stages on Ray Train + DeepSpeed; ``tune``: sweeps; ``serving/``: the Ray Serve endpoint.
- ``eval/``: distributed encoding, ``evaluate``, index building; ``pipeline``, ``ablate``, ``data_efficiency``,
  ``report``: the runs that chain them; ``local_cluster``, ``ray_setup``, ``tracking``: the cluster and the store.
"""
