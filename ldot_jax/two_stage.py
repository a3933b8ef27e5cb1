"""`python -m ldot_jax.two_stage`: kept for existing scripts; the command is `ldot evaluate`."""

import sys

from ldot_jax.tools.evaluate_cli import main

if __name__ == "__main__":
    sys.exit(main())
