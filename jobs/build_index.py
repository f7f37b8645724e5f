"""Encode a split's gallery once into a search index (safetensors embeddings + parquet names + model fingerprint).

    python jobs/build_index.py --config jobs/configs/eval_cirr_val.yaml --set split=test1 --set out=runs/index ...

The same as ``detailfusion index ...`` (the one front door, ``detailfusion.platform.cli``), for
``ray job submit`` where the console script is not on the cluster's PATH.
"""

import sys

from detailfusion.platform.cli import main

if __name__ == "__main__":
    sys.exit(main(["index", *sys.argv[1:]], prog="jobs/build_index.py"))
