#!/usr/bin/env bash
# N processes on this machine as one JAX job (CPU devices, gloo): multi-host code paths
# without a cluster.
#   launch/local.sh 2 ldot_jax/configs/demo.py:pretrain,tiny runs/two_process [--config.x=y ...]
set -euo pipefail
processes=${1:?number of processes}; config=${2:?config}; workdir=${3:?workdir}; shift 3
exec ldot launch --processes "$processes" --devices_per_process "${DEVICES_PER_PROCESS:-2}" -- \
  --config="$config" --workdir="$workdir" "$@"
