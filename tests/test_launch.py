"""The launchers' --dry_run prints exactly the commands they would run, and bad usage exits 2."""

import os
import subprocess

import pytest

LAUNCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "launch")
TRAIN = ["paxlike", "train", "--gin_file", "layouts/fsdp.gin", "--model_dir", "gs://bucket/run"]


def _launch(script, *args):
    return subprocess.run([os.path.join(LAUNCH, script), *args], capture_output=True, text=True,
                          env={**os.environ, "XLA_FLAGS": ""})


def test_local_multiprocess_dry_run():
    out = _launch("local_multiprocess.sh", "--dry_run", "--port", "9999", "2", "4", "--", *TRAIN)
    assert out.returncode == 0, out.stderr
    common = ("PAXLIKE_COORDINATOR=127.0.0.1:9999 PAXLIKE_NUM_PROCESSES=2 PAXLIKE_PROCESS_ID={} "
              "JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=4 "
              "paxlike train --gin_file layouts/fsdp.gin --model_dir gs://bucket/run")
    assert out.stdout.splitlines() == [f"env {common.format(i)} " for i in range(2)]


def test_tpu_vm_pod_dry_run():
    out = _launch("tpu_vm_pod.sh", "--dry_run", "--tpu", "pod", "--zone", "us-central2-b",
                  "--project", "proj", "--", *TRAIN)
    assert out.returncode == 0, out.stderr
    assert out.stdout == (
        "gcloud compute tpus tpu-vm ssh pod --zone=us-central2-b --worker=all "
        r"--command=cd\ ~/paxlike\ \&\&\ PAXLIKE_DISTRIBUTED=auto\ paxlike\ train\ --gin_file\ "
        r"layouts/fsdp.gin\ --model_dir\ gs://bucket/run --project=proj " "\n")


def test_gke_jobset_dry_run():
    out = _launch("gke_jobset.sh", "--dry_run", "--image", "gcr.io/p/paxlike", "--tpu_type",
                  "tpu-v5-lite-podslice", "--topology", "16x16", "--hosts", "64", "--slices", "2",
                  "--", *TRAIN)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert "kind: JobSet" in lines and lines[-1].startswith("kubectl apply -f -")
    for line in ("    replicas: 2", "        parallelism: 64",
                 "              cloud.google.com/gke-tpu-topology: 16x16",
                 '              command: ["bash", "-c", "PAXLIKE_DISTRIBUTED=auto paxlike train '
                 '--gin_file layouts/fsdp.gin --model_dir gs://bucket/run"]'):
        assert line in lines
    xpk = _launch("gke_jobset.sh", "--dry_run", "--xpk", "--cluster", "c", "--image", "img",
                  "--tpu_type", "v5litepod", "--topology", "256", "--hosts", "64", "--", *TRAIN)
    assert xpk.stdout.startswith("xpk workload create --cluster=c --workload=paxlike "
                                 "--docker-image=img --tpu-type=v5litepod-256 --num-slices=1 ")


def test_slurm_dry_run():
    out = _launch("slurm_gpu.sh", "--dry_run", "--nodes", "4", "--gpus_per_node", "8", "--", *TRAIN)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    for line in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8",
                 "srun --kill-on-bad-exit=1 env PAXLIKE_DISTRIBUTED=auto paxlike train --gin_file "
                 "layouts/fsdp.gin --model_dir gs://bucket/run "):
        assert line in lines
    assert lines[-1] == "sbatch   # with the script above on stdin"


@pytest.mark.parametrize("script", ["local_multiprocess.sh", "tpu_vm_pod.sh", "gke_jobset.sh",
                                    "slurm_gpu.sh"])
def test_bad_usage_exits_2(script):
    out = _launch(script, "--no_such_flag")
    assert out.returncode == 2 and "error" in out.stderr
