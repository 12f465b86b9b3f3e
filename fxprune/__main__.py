"""``python -m fxprune ...``: the same as the ``fxprune`` command."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
