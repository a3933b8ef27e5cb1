"""`python -m ldot_jax COMMAND ...` is `ldot COMMAND ...` (ldot_jax/tools/cli.py)."""

import sys

from ldot_jax.tools.cli import main

if __name__ == "__main__":
    sys.exit(main())
