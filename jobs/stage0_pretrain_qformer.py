"""Stage 0 (tiny preset): the Q-Former's image-text pre-training (BLIP-2's ITC) on IPr2Pr images and their captions,
on Ray Train with DeepSpeed; the stand-in for BLIP-2's pre-trained Q-Former (METHOD.md "Starting points").

    python jobs/stage0_pretrain_qformer.py --config jobs/configs/stage0_tiny.yaml --set data.prepared=runs/prep/ipr2pr

The same as ``detailfusion train --stage 0 ...`` (the one front door, ``detailfusion.platform.cli``), for
``ray job submit`` where the console script is not on the cluster's PATH.
"""

import sys

from detailfusion.platform.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", "--stage", "0", *sys.argv[1:]], prog="jobs/stage0_pretrain_qformer.py"))
