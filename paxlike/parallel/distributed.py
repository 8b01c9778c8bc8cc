"""Joining a multi-process job: `jax.distributed.initialize` from PAXLIKE_* variables or the cluster's own."""

from __future__ import annotations

import logging
import os

from paxlike.errors import UserError

log = logging.getLogger("paxlike")

# Set by launch/local_multiprocess.sh (or by hand): one coordinator, N processes, this one's id.
COORDINATOR = "PAXLIKE_COORDINATOR"
NUM_PROCESSES = "PAXLIKE_NUM_PROCESSES"
PROCESS_ID = "PAXLIKE_PROCESS_ID"
# Set to 'auto' by the TPU-pod, GKE and Slurm launchers: JAX reads the cluster's environment.
DISTRIBUTED = "PAXLIKE_DISTRIBUTED"


def _int_env(name: str) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value)
    except ValueError:
        raise UserError(f"{name} = {value!r}; set it to an integer alongside {COORDINATOR}") from None


def initialize() -> bool:
    """Initialises JAX's distributed runtime when the environment asks for it; True if it did.

    Must run before anything touches a JAX backend.
    """
    import jax

    if os.environ.get(COORDINATOR):
        num_processes, process_id = _int_env(NUM_PROCESSES), _int_env(PROCESS_ID)
        if not 0 <= process_id < num_processes:
            raise UserError(f"{PROCESS_ID} = {process_id} is outside 0..{num_processes - 1}; "
                            f"give each of the {NUM_PROCESSES} processes a distinct id")
        # Host CPU devices of different processes exchange collectives through gloo;
        # accelerators use their own interconnect and ignore this.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=os.environ[COORDINATOR],
                                   num_processes=num_processes, process_id=process_id)
    elif os.environ.get(DISTRIBUTED, "").lower() == "auto":
        jax.distributed.initialize()  # TPU VM pods, GKE JobSets, Slurm: detected by JAX
    else:
        return False
    log.info("process %d of %d, %d local of %d devices", jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count())
    return True
