"""``python -m fastspawn``: the ``fastspawn`` command (see ``fastspawn --help``)."""

import sys

from fastspawn._cli import main

if __name__ == "__main__":
    sys.exit(main())
