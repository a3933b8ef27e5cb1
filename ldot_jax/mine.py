"""`python -m ldot_jax.mine`: kept for existing scripts; the command is `ldot mine`."""

import sys

from ldot_jax.tools.mine_cli import main

if __name__ == "__main__":
    sys.exit(main())
