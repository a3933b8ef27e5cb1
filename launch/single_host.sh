#!/usr/bin/env bash
# One machine, all its accelerators (one process; the mesh spans every local device).
#   launch/single_host.sh ldot_jax/configs/finetune_flickr30k.py runs/ft_flickr [--config.x=y ...]
set -euo pipefail
config=${1:?config}; workdir=${2:?workdir}; shift 2
# Let XLA take most of the GPU memory up front; no effect on TPU / CPU.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
exec ldot train --config="$config" --workdir="$workdir" "$@"
