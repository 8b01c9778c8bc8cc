#!/usr/bin/env bash
# Starts NUM_PROCESSES copies of a paxlike command on this machine, each a JAX process
# with DEVICES_PER_PROCESS host CPU devices, joined through jax.distributed (gloo collectives).
# Each process reads its own data shard; process 0 writes metrics and config.
#
# Usage:
#   launch/local_multiprocess.sh [--dry_run] [--port PORT] NUM_PROCESSES DEVICES_PER_PROCESS -- paxlike train ...
# Example (2 processes x 4 devices = the 8-device mesh of one process x 8):
#   launch/local_multiprocess.sh 2 4 -- paxlike train --gin_file models/tiny_palm.gin \
#     --gin_file runs/pretrain.gin --gin.TRAIN_STEPS=20 --gin.DataConfig.num_shards=2 --model_dir /tmp/mp
# Expect: one log of losses (process 0's), equal to the single-process run's with the same
# DataConfig.num_shards. The exit status is the first non-zero one of the processes.
set -euo pipefail

dry_run=0
port=${PAXLIKE_PORT:-12355}
while [[ $# -gt 0 && $1 == --* ]]; do
  case $1 in
    --dry_run) dry_run=1; shift ;;
    --port) port=$2; shift 2 ;;
    *) echo "local_multiprocess.sh: error: unknown flag $1" >&2; exit 2 ;;
  esac
done
if [[ $# -lt 4 || $3 != "--" || ! $1 =~ ^[1-9][0-9]*$ || ! $2 =~ ^[1-9][0-9]*$ ]]; then
  echo "local_multiprocess.sh: error: usage: $0 [--dry_run] [--port PORT] NUM_PROCESSES DEVICES_PER_PROCESS -- COMMAND..." >&2
  exit 2
fi
num_processes=$1 devices=$2
shift 3

pids=()
for ((i = 0; i < num_processes; i++)); do
  env_vars=(PAXLIKE_COORDINATOR=127.0.0.1:$port PAXLIKE_NUM_PROCESSES=$num_processes
            PAXLIKE_PROCESS_ID=$i JAX_PLATFORMS=cpu
            "XLA_FLAGS=${XLA_FLAGS:+$XLA_FLAGS }--xla_force_host_platform_device_count=$devices")
  if ((dry_run)); then
    printf '%q ' env "${env_vars[@]}" "$@"; echo
    continue
  fi
  env "${env_vars[@]}" "$@" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do
  wait "$pid" || { s=$?; ((status == 0)) && status=$s; }
done
exit $status
