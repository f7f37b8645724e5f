"""Ray Tune sweep of one training stage: every trial is a full Ray Train run, scored on validation recall.

    python jobs/sweep.py --stage 2 --space tune_spaces/gamma.yaml --config jobs/configs/stage2_tiny.yaml \\
        --set data.val_prepared=runs/tiny/prep/cirr-val
    ray job submit --working-dir . -- "$(which python)" jobs/sweep.py --stage 2 --space ... --config ... --set ...

Rerunning the same command resumes an interrupted sweep. The same as ``detailfusion sweep ...`` (the one front door, ``detailfusion.platform.cli``), for
``ray job submit`` where the console script is not on the cluster's PATH.
"""

import sys

from detailfusion.platform.cli import main

if __name__ == "__main__":
    sys.exit(main(["sweep", *sys.argv[1:]], prog="jobs/sweep.py"))
