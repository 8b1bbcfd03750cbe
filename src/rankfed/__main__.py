"""``python -m rankfed``: the same as the ``rankfed`` command."""

import sys

from rankfed.app.cli import main

if __name__ == "__main__":
    sys.exit(main())
