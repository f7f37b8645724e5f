"""Encode a split's gallery once into a search index (safetensors embeddings + parquet names + model fingerprint).

    python jobs/build_index.py --config jobs/configs/eval_cirr_val.yaml --set split=test1 --set out=runs/index ...
"""

import sys

from detailfusion.config import EvalConfig
from detailfusion.eval.evaluate import build_index
from detailfusion.jobs import run_job

if __name__ == "__main__":
    sys.exit(run_job(EvalConfig, build_index, __doc__))
