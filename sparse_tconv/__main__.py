"""``python -m sparse_tconv``: the ``sparse-tconv`` command."""

import sys

from .tools.cli import main

if __name__ == "__main__":
    sys.exit(main())
