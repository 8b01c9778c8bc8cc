#!/usr/bin/env bash
# Submits one paxlike command to Slurm on GPU nodes: one process per node driving all of
# its GPUs; jax.distributed.initialize() takes the coordinator, process count and id from
# the SLURM_* variables srun sets.
#
# Usage:
#   launch/slurm_gpu.sh [--dry_run] --nodes N [--gpus_per_node G] [--partition P] [--time HH:MM:SS] -- paxlike train ...
# Example:
#   launch/slurm_gpu.sh --nodes 4 --gpus_per_node 8 -- paxlike train --gin_file models/llama_7b.gin \
#     --gin_file runs/llama_adamw.gin --gin_file layouts/fsdp_tp.gin --model_dir /shared/llama_7b
# Expect: with --dry_run, the sbatch script and the sbatch command, printed and not run.
# MODEL_DIR must be on a file system every node mounts.
set -euo pipefail

dry_run=0 nodes="" gpus=8 partition="" time_limit="24:00:00"
while [[ $# -gt 0 && $1 != "--" ]]; do
  case $1 in
    --dry_run) dry_run=1; shift ;;
    --nodes) nodes=$2; shift 2 ;;
    --gpus_per_node) gpus=$2; shift 2 ;;
    --partition) partition=$2; shift 2 ;;
    --time) time_limit=$2; shift 2 ;;
    *) echo "slurm_gpu.sh: error: unknown flag $1; see the usage at the top of $0" >&2; exit 2 ;;
  esac
done
if [[ -z $nodes || $# -lt 2 ]]; then
  echo "slurm_gpu.sh: error: need --nodes N -- COMMAND..." >&2
  exit 2
fi
shift  # the "--"

script="#!/usr/bin/env bash
#SBATCH --job-name=paxlike
#SBATCH --nodes=$nodes
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=$gpus
#SBATCH --exclusive
#SBATCH --time=$time_limit${partition:+
#SBATCH --partition=$partition}
set -euo pipefail
srun --kill-on-bad-exit=1 env PAXLIKE_DISTRIBUTED=auto $(printf '%q ' "$@")"
if ((dry_run)); then
  echo "$script"
  echo "---"
  echo "sbatch   # with the script above on stdin"
else
  echo "$script" | sbatch
fi
