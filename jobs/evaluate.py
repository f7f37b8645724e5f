"""Evaluate an exported model on a split with the field's protocol, every ablation variant (Ray Data encoders).

    python jobs/evaluate.py --config jobs/configs/eval_cirr_val.yaml --set root=/data/cirr --set checkpoint=runs/x/stage3/model
    ray job submit --working-dir . -- "$(which python)" jobs/evaluate.py --config ... --set ...
"""

import sys

from detailfusion.config import EvalConfig
from detailfusion.eval.evaluate import evaluate
from detailfusion.jobs import run_job

if __name__ == "__main__":
    sys.exit(run_job(EvalConfig, evaluate, __doc__))
