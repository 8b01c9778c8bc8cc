#!/usr/bin/env bash
# Runs one paxlike command on a GKE TPU node pool as a JobSet (one pod per TPU host, all
# started together), or through xpk. Each pod calls jax.distributed.initialize(), which
# reads the JobSet's environment.
#
# Usage:
#   launch/gke_jobset.sh [--dry_run] [--xpk --cluster NAME] --image IMAGE --tpu_type TYPE \
#     --topology AxB[xC] --hosts N [--slices S] [--name NAME] -- paxlike train ...
# Example:
#   launch/gke_jobset.sh --image gcr.io/my-project/paxlike --tpu_type tpu-v5-lite-podslice \
#     --topology 16x16 --hosts 64 -- paxlike train --gin_file models/palm_8b.gin \
#     --gin_file runs/palm_adafactor.gin --gin_file layouts/multislice_dp.gin --model_dir gs://b/run
# Expect: with --dry_run, the JobSet manifest and the kubectl command (or the xpk command)
# that would run, printed and not run. MODEL_DIR must be a bucket every pod sees.
set -euo pipefail

dry_run=0 xpk=0 cluster="" image="" tpu_type="" topology="" hosts="" slices=1 name=paxlike
while [[ $# -gt 0 && $1 != "--" ]]; do
  case $1 in
    --dry_run) dry_run=1; shift ;;
    --xpk) xpk=1; shift ;;
    --cluster) cluster=$2; shift 2 ;;
    --image) image=$2; shift 2 ;;
    --tpu_type) tpu_type=$2; shift 2 ;;
    --topology) topology=$2; shift 2 ;;
    --hosts) hosts=$2; shift 2 ;;
    --slices) slices=$2; shift 2 ;;
    --name) name=$2; shift 2 ;;
    *) echo "gke_jobset.sh: error: unknown flag $1; see the usage at the top of $0" >&2; exit 2 ;;
  esac
done
if [[ -z $image || -z $tpu_type || -z $topology || -z $hosts || $# -lt 2 ]] || { ((xpk)) && [[ -z $cluster ]]; }; then
  echo "gke_jobset.sh: error: need --image --tpu_type --topology --hosts (and --cluster with --xpk) -- COMMAND..." >&2
  exit 2
fi
shift  # the "--"
command="PAXLIKE_DISTRIBUTED=auto $(printf '%q ' "$@")"
command=${command% }

if ((xpk)); then
  cmd=(xpk workload create "--cluster=$cluster" "--workload=$name" "--docker-image=$image"
       "--tpu-type=$tpu_type-$topology" "--num-slices=$slices" "--command=$command")
  if ((dry_run)); then printf '%q ' "${cmd[@]}"; echo; else exec "${cmd[@]}"; fi
  exit 0
fi

manifest=$(cat <<YAML
apiVersion: jobset.x-k8s.io/v1alpha2
kind: JobSet
metadata:
  name: $name
  annotations:
    alpha.jobset.sigs.k8s.io/exclusive-topology: cloud.google.com/gke-nodepool
spec:
  failurePolicy:
    maxRestarts: 3
  replicatedJobs:
  - name: slice
    replicas: $slices
    template:
      spec:
        parallelism: $hosts
        completions: $hosts
        backoffLimit: 0
        template:
          spec:
            restartPolicy: Never
            nodeSelector:
              cloud.google.com/gke-tpu-accelerator: $tpu_type
              cloud.google.com/gke-tpu-topology: $topology
            containers:
            - name: paxlike
              image: $image
              command: ["bash", "-c", $(printf '%s' "$command" | sed 's/\\/\\\\/g; s/"/\\"/g; s/.*/"&"/')]
              resources:
                limits:
                  google.com/tpu: 4
YAML
)
if ((dry_run)); then
  echo "$manifest"
  echo "---"
  echo "kubectl apply -f -   # the manifest above"
else
  echo "$manifest" | kubectl apply -f -
fi
