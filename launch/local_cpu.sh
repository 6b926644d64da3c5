#!/usr/bin/env bash
# N CPU processes on this machine, each with D emulated devices, training as one multi-host job.
#
#   launch/local_cpu.sh [dsv3-train flags...]              # 2 processes x 4 devices
#   NPROC=4 DEVICES=2 launch/local_cpu.sh --mesh data=2,expert=4 --steps 20 --workdir runs/mp
#
# Every process runs `dsv3-train --distributed`: jax.distributed.initialize() with the coordinator on
# 127.0.0.1:$PORT (process 0 serves it), cross-process collectives over gloo. The mesh spans all
# NPROC x DEVICES devices. Process 0 prints to the terminal; process i logs to $LOG_DIR/process_i.log.
# If any process fails, the others are stopped and the script exits with its status.
set -euo pipefail

NPROC=${NPROC:-2}
DEVICES=${DEVICES:-4}
PORT=${PORT:-12355}
LOG_DIR=${LOG_DIR:-$(mktemp -d -t dsv3-local-cpu.XXXXXX)}
TRAIN=${DSV3_TRAIN:-dsv3-train}

export JAX_PLATFORMS=cpu
# drop any device count already set, then emulate $DEVICES CPU devices per process
XLA_FLAGS=$(echo "${XLA_FLAGS:-}" | sed -E 's/--xla_force_host_platform_device_count=[0-9]+//g')
export XLA_FLAGS="$XLA_FLAGS --xla_force_host_platform_device_count=$DEVICES"

mkdir -p "$LOG_DIR"
pids=()
for ((i = 0; i < NPROC; i++)); do
  args=(--distributed --coordinator "127.0.0.1:$PORT" --num_processes "$NPROC" --process_id "$i" "$@")
  if ((i == 0)); then
    $TRAIN "${args[@]}" &
  else
    $TRAIN "${args[@]}" --noprogress >"$LOG_DIR/process_$i.log" 2>&1 &
  fi
  pids+=($!)
done

status=0
for ((i = 0; i < NPROC; i++)); do
  if ! wait -n; then
    status=1
    break
  fi
done
if ((status)); then
  echo "local_cpu.sh: a process failed; stopping the others (logs in $LOG_DIR)" >&2
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait || true
fi
exit $status
