"""Stage 1: detail-branch pre-training (DI branch, L_DI) on IPr2Pr, on Ray Train with DeepSpeed.

    python jobs/stage1_pretrain_detail.py --config jobs/configs/stage1_tiny.yaml --set data.prepared=runs/prep/ipr2pr
    ray job submit --working-dir . -- "$(which python)" jobs/stage1_pretrain_detail.py --config jobs/configs/stage1_blip2.yaml

The same as ``detailfusion train --stage 1 ...`` (the one front door, ``detailfusion.platform.cli``), for
``ray job submit`` where the console script is not on the cluster's PATH.
"""

import sys

from detailfusion.platform.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", "--stage", "1", *sys.argv[1:]], prog="jobs/stage1_pretrain_detail.py"))
