"""Evaluate an exported model on a split with the field's protocol, every ablation variant (Ray Data encoders).

    python jobs/evaluate.py --config jobs/configs/eval_cirr_val.yaml --set root=/data/cirr --set checkpoint=runs/x/stage3/model
    ray job submit --working-dir . -- "$(which python)" jobs/evaluate.py --config ... --set ...

The same as ``detailfusion evaluate ...`` (the one front door, ``detailfusion.platform.cli``), for
``ray job submit`` where the console script is not on the cluster's PATH.
"""

import sys

from detailfusion.platform.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]], prog="jobs/evaluate.py"))
