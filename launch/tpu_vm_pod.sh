#!/usr/bin/env bash
# Runs one paxlike command on every host of a Cloud TPU VM pod slice at once; each host
# joins the job through jax.distributed.initialize(), which finds its peers itself.
#
# Usage:
#   launch/tpu_vm_pod.sh [--dry_run] --tpu NAME --zone ZONE [--project PROJECT] [--repo DIR] -- paxlike train ...
# Example:
#   launch/tpu_vm_pod.sh --tpu my-v4-128 --zone us-central2-b -- paxlike train \
#     --gin_file models/palm_8b.gin --gin_file runs/palm_adafactor.gin --gin_file layouts/fsdp.gin \
#     --model_dir gs://my-bucket/palm_8b
# Expect: with --dry_run, the one gcloud command that would run, printed and not run.
# MODEL_DIR must be storage every host sees (a gs:// bucket). paxlike must be installed
# on every host (pip install -e ".[tpu]" in --repo, default ~/paxlike).
set -euo pipefail

dry_run=0 tpu="" zone="" project="" repo="~/paxlike"
while [[ $# -gt 0 && $1 != "--" ]]; do
  case $1 in
    --dry_run) dry_run=1; shift ;;
    --tpu) tpu=$2; shift 2 ;;
    --zone) zone=$2; shift 2 ;;
    --project) project=$2; shift 2 ;;
    --repo) repo=$2; shift 2 ;;
    *) echo "tpu_vm_pod.sh: error: unknown flag $1; see the usage at the top of $0" >&2; exit 2 ;;
  esac
done
if [[ -z $tpu || -z $zone || $# -lt 2 ]]; then
  echo "tpu_vm_pod.sh: error: need --tpu NAME --zone ZONE -- COMMAND..." >&2
  exit 2
fi
shift  # the "--"
remote="cd $repo && PAXLIKE_DISTRIBUTED=auto $(printf '%q ' "$@")"
cmd=(gcloud compute tpus tpu-vm ssh "$tpu" "--zone=$zone" --worker=all "--command=${remote% }")
[[ -n $project ]] && cmd+=("--project=$project")
if ((dry_run)); then
  printf '%q ' "${cmd[@]}"; echo
else
  exec "${cmd[@]}"
fi
