"""The library layer: everything DetailFusion is without a cluster, usable in a notebook. It imports no Ray,
DeepSpeed or MLflow and nothing of ``detailfusion.platform`` (``lint-imports`` keeps it so).

- ``config``: typed configs; ``errors``; ``pixels``: uint8 pixels -> the model's input tensor.
- ``model/``: the model (BLIP-2 parts from transformers), its compositors and fusion rules, inference.
- ``losses``, ``objectives``: the losses and what each training stage optimises.
- ``index/``: gallery storage, exact and compressed search, shards; ``ranking``.
- ``data/``: canonical schemas, the dataset readers, the synthetic datasets and their shortcut report.
- ``eval/``: metrics, protocols, submission files, per-query outcomes, statistics and the paper's claims.
"""
