"""Stage 3: compositor training (L_C) with both branches frozen, on their outputs computed once.

    python jobs/stage3_compositor.py --config jobs/configs/stage3_tiny.yaml --set model.init_from=runs/tiny/stage2/model
    ray job submit --working-dir . -- "$(which python)" jobs/stage3_compositor.py --config jobs/configs/stage3_blip2_cirr.yaml

The same as ``detailfusion train --stage 3 ...`` (the one front door, ``detailfusion.platform.cli``), for
``ray job submit`` where the console script is not on the cluster's PATH.
"""

import sys

from detailfusion.platform.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", "--stage", "3", *sys.argv[1:]], prog="jobs/stage3_compositor.py"))
