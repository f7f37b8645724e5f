"""Prepare one dataset split into canonical shards (Ray Data).

    python jobs/prepare_data.py --config jobs/configs/prepare_cirr_val.yaml --set root=/data/cirr --set out=runs/cirr-val
    ray job submit --working-dir . -- "$(which python)" jobs/prepare_data.py --config ... --set ...

The same as ``detailfusion prepare ...`` (the one front door, ``detailfusion.platform.cli``), for
``ray job submit`` where the console script is not on the cluster's PATH.
"""

import sys

from detailfusion.platform.cli import main

if __name__ == "__main__":
    sys.exit(main(["prepare", *sys.argv[1:]], prog="jobs/prepare_data.py"))
