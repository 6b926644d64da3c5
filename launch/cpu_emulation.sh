#!/usr/bin/env bash
# One process, $DEVICES emulated CPU devices: try any mesh on a laptop before renting GPUs.
#
#   launch/cpu_emulation.sh                                   # 8 devices, mesh data=2,expert=4, tiny model
#   DEVICES=4 MESH=expert=4 launch/cpu_emulation.sh --steps 50 --workdir runs/ep4
#
# XLA's --xla_force_host_platform_device_count splits the host CPU into that many devices; the mesh,
# the shardings and the all-to-all expert dispatch are the ones a multi-GPU run compiles.
set -euo pipefail

DEVICES=${DEVICES:-8}
MESH=${MESH:-data=2,expert=4}

export JAX_PLATFORMS=cpu
XLA_FLAGS=$(echo "${XLA_FLAGS:-}" | sed -E 's/--xla_force_host_platform_device_count=[0-9]+//g')
export XLA_FLAGS="$XLA_FLAGS --xla_force_host_platform_device_count=$DEVICES"
exec "${DSV3_TRAIN:-dsv3-train}" --mesh "$MESH" "$@"
