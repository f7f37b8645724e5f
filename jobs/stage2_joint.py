"""Stage 2: joint fine-tuning of both branches (L_DI + gamma L_GM) on CIRR or FashionIQ, starting from stage 1.

    python jobs/stage2_joint.py --config jobs/configs/stage2_tiny.yaml --set model.init_from=runs/tiny/stage1/model
    ray job submit --working-dir . -- "$(which python)" jobs/stage2_joint.py --config jobs/configs/stage2_blip2_cirr.yaml
"""

import sys

from detailfusion.jobs import run_stage_job

if __name__ == "__main__":
    sys.exit(run_stage_job(2, __doc__))
