"""`python -m ldot_jax.launch`: kept for existing scripts; the command is `ldot launch`."""

import sys

from ldot_jax.tools.launch import main

if __name__ == "__main__":
    sys.exit(main())
