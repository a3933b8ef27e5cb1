"""python -m ldot_jax.index {build,info,query} (see ldot_jax/index/cli.py)."""

import sys

from ldot_jax.index.cli import main

sys.exit(main())
