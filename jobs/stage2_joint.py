"""Stage 2: joint fine-tuning of both branches (L_DI + gamma L_GM) on CIRR or FashionIQ, starting from stage 1.

    python jobs/stage2_joint.py --config jobs/configs/stage2_tiny.yaml --set model.init_from=runs/tiny/stage1/model
    ray job submit --working-dir . -- "$(which python)" jobs/stage2_joint.py --config jobs/configs/stage2_blip2_cirr.yaml

The same as ``detailfusion train --stage 2 ...`` (the one front door, ``detailfusion.platform.cli``), for
``ray job submit`` where the console script is not on the cluster's PATH.
"""

import sys

from detailfusion.platform.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", "--stage", "2", *sys.argv[1:]], prog="jobs/stage2_joint.py"))
