"""Prepare one dataset split into canonical shards (Ray Data).

    python jobs/prepare_data.py --config jobs/configs/prepare_cirr_val.yaml --set root=/data/cirr --set out=runs/cirr-val
    ray job submit --working-dir . -- "$(which python)" jobs/prepare_data.py --config ... --set ...
"""

import sys

from detailfusion.config import PrepareConfig
from detailfusion.data.prepare import prepare
from detailfusion.jobs import run_job

if __name__ == "__main__":
    sys.exit(run_job(PrepareConfig, prepare, __doc__))
