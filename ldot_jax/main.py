"""`python -m ldot_jax.main`: kept for existing scripts; the command is `ldot train`."""

import sys

from ldot_jax.tools.train_cli import main

if __name__ == "__main__":
    sys.exit(main())
