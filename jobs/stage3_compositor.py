"""Stage 3: compositor training (L_C) with both branches frozen, on their outputs computed once.

    python jobs/stage3_compositor.py --config jobs/configs/stage3_tiny.yaml --set model.init_from=runs/tiny/stage2/model
    ray job submit --working-dir . -- "$(which python)" jobs/stage3_compositor.py --config jobs/configs/stage3_blip2_cirr.yaml
"""

import sys

from detailfusion.jobs import run_stage_job

if __name__ == "__main__":
    sys.exit(run_stage_job(3, __doc__))
