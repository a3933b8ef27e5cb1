#!/usr/bin/env bash
# A Cloud TPU pod slice: the same command on every worker; jax.distributed detects the pod.
#   launch/tpu_pod.sh my-tpu us-central2-b ldot_jax/configs/pretrain.py gs://bucket/runs/pretrain \
#       [--config.x=y ...]
# Assumes this repository is checked out at ~/ldot_jax on every worker with its .venv
# installed (e.g. the same command with "make install"), and the data / workdir on storage
# every worker reads (GCS, Filestore).
set -euo pipefail
tpu=${1:?TPU name}; zone=${2:?zone}; config=${3:?config}; workdir=${4:?workdir}; shift 4
extra=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$tpu" --zone="$zone" --worker=all --command \
  "cd ~/ldot_jax && .venv/bin/ldot train --config=$config --workdir=$workdir$extra"
