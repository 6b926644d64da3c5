#!/usr/bin/env bash
# Train on a Cloud TPU pod slice: the same dsv3-train on every TPU VM worker at once.
#
#   TPU=my-v5p-64 ZONE=us-east5-a launch/tpu_pod.sh --config deepseek-v2-lite --mesh data=-1,expert=8 \
#       --workdir gs://my-bucket/runs/v2lite
#
# jax.distributed.initialize() finds the coordinator, the worker count and this worker's index in the
# TPU VM metadata, so no address is given. Every worker must have the package installed (first command)
# and the same --workdir, which orbax can write on GCS. Routed experts use the ragged all-to-all on TPU.
set -euo pipefail
: "${TPU:?set TPU to the pod slice name}" "${ZONE:?set ZONE}"
REPO=${REPO:-https://github.com/your-org/dsv3_jax.git}

gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all \
  --command "test -d dsv3_jax || git clone $REPO dsv3_jax; cd dsv3_jax && pip install -q -e . 'jax[tpu]'"
gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all \
  --command "cd dsv3_jax && dsv3-train --distributed --noprogress $(printf '%q ' "$@")"
