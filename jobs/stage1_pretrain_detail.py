"""Stage 1: detail-branch pre-training (DI branch, L_DI) on IPr2Pr, on Ray Train with DeepSpeed.

    python jobs/stage1_pretrain_detail.py --config jobs/configs/stage1_tiny.yaml --set data.prepared=runs/prep/ipr2pr
    ray job submit --working-dir . -- "$(which python)" jobs/stage1_pretrain_detail.py --config jobs/configs/stage1_blip2.yaml
"""

import sys

from detailfusion.jobs import run_stage_job

if __name__ == "__main__":
    sys.exit(run_stage_job(1, __doc__))
