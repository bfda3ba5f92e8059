"""`python -m matelike` is the same as the `matelike` console script."""

import sys

from matelike.cli import main

if __name__ == "__main__":
    sys.exit(main())
