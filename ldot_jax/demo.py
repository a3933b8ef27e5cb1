"""`python -m ldot_jax.demo`: kept for existing scripts; the command is `ldot demo`."""

import sys

from ldot_jax.tools.demo import main

if __name__ == "__main__":
    sys.exit(main())
