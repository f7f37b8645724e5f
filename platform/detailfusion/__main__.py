"""``python -m detailfusion <command> ...``: the console script's front door (``ray job submit -- python -m ...``)."""

import sys

from detailfusion.platform.cli import main

sys.exit(main(prog="python -m detailfusion"))
