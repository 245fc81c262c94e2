"""``python -m glmkit.grading <command>``: see ``--help``."""

import sys

from glmkit.grading import main

if __name__ == "__main__":
    sys.exit(main())
