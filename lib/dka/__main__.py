"""`python -m dka <command>`: see `dka.cli`."""

import sys

from dka.cli import main

if __name__ == "__main__":
    sys.exit(main())
