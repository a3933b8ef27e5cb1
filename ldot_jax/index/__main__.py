"""`python -m ldot_jax.index`: kept for existing scripts; the command is `ldot index`."""

import sys

from ldot_jax.tools.index_cli import main

sys.exit(main())
