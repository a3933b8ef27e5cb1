#!/usr/bin/env bash
# A Cloud TPU pod slice: the same command on every worker; jax.distributed detects the pod.
#   launch/tpu_pod.sh my-tpu us-central2-b ldot_jax/configs/pretrain.py gs://bucket/runs/pretrain \
#       [--config.x=y ...]
# Assumes this repository is checked out at ~/ldot_jax on every worker with its .venv
# installed with the gcs extra (on every worker: .venv/bin/pip install -e '.[gcs]'), and the
# data / workdir on storage every worker reads (GCS, Filestore). A worker without gcsfs
# stops before training with that instruction.
set -euo pipefail
tpu=${1:?TPU name}; zone=${2:?zone}; config=${3:?config}; workdir=${4:?workdir}; shift 4
extra=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$tpu" --zone="$zone" --worker=all --command \
  "cd ~/ldot_jax && { .venv/bin/python -c 'import gcsfs' 2>/dev/null || { echo \"\$(hostname): gcsfs missing: .venv/bin/pip install -e '.[gcs]'\" >&2; exit 1; }; } && .venv/bin/ldot train --config=$config --workdir=$workdir$extra"
