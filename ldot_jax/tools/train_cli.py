"""`ldot train`: the training entry point.

    ldot train --config=ldot_jax/configs/demo.py:pretrain --workdir=runs/demo/pretrain \
        [--config.train.num_steps=500 ...]

`--config` takes a config file path or a packaged name (`ldot_jax/configs/<file>.py[:arg]`,
found inside the installed package from any directory).

Multi-process: every process runs the same command; `jax.distributed` starts from
--coordinator_address / --num_processes / --process_id, the LDOT_* environment variables, or
SLURM / Open MPI / TPU-pod detection (ldot_jax/core/parallel.py, launch/).
"""

from __future__ import annotations

import logging
import sys

from absl import app, flags
from ml_collections import config_flags

from ldot_jax import configs

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file[:arg]",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory (checkpoints, metrics)",
                               required=True)
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "processes in the job")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "this process's index")


def _main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _CONFIG.value is None:
        raise app.UsageError("--config is required")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                        force=True)
    # Orbax logs every file operation at INFO through absl; keep warnings only.
    logging.getLogger("absl").setLevel(logging.WARNING)
    from ldot_jax.core import parallel  # after flags: importing JAX is slow for --help
    parallel.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    from ldot_jax.training import train
    summary = train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    import jax
    if jax.process_index() == 0:
        print(train.summary_json(summary))



def main(argv: list[str] | None = None) -> int:
    """Runs training with `argv` (default: sys.argv[1:]); packaged config names resolved."""
    argv = sys.argv[1:] if argv is None else list(argv)
    repeated = configs.repeated_overrides(argv)
    if repeated:
        print(f"ldot train: {', '.join('--' + k for k in repeated)} given more than once; give "
              f"each config override once (ml_collections appends a repeated tuple override "
              f"to the first instead of replacing it)", file=sys.stderr)
        return 2
    app.run(_main, argv=["ldot train", *configs.resolve_flags(argv)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
