"""`python -m ldot_jax.convert`: kept for existing scripts; the command is `ldot convert`."""

import sys

from ldot_jax.tools.convert_cli import main

if __name__ == "__main__":
    sys.exit(main())
