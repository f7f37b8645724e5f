"""Stage 0 (tiny preset): the Q-Former's image-text pre-training (BLIP-2's ITC) on IPr2Pr images and their captions,
on Ray Train with DeepSpeed; the stand-in for BLIP-2's pre-trained Q-Former (METHOD.md "Starting points").

    python jobs/stage0_pretrain_qformer.py --config jobs/configs/stage0_tiny.yaml --set data.prepared=runs/prep/ipr2pr
"""

import sys

from detailfusion.jobs import run_stage_job

if __name__ == "__main__":
    sys.exit(run_stage_job(0, __doc__))
