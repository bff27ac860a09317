"""Joining several processes (hosts) into one JAX program.

`jax.distributed.initialize` must run before anything touches a device. It is called when
the command line names a coordinator (GPU clusters, or two processes on one machine), or when
the environment shows a multi-host launch that JAX discovers by itself: a TPU pod slice
(several TPU workers), SLURM or Open MPI with more than one task, or when --tpu says this is a
Cloud TPU VM (JAX then finds the slice's workers in the VM's metadata).
"""

from __future__ import annotations

import os

from gpt2train.errors import UserError


def _launched_by_cluster() -> bool:
    tpu_hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return ("," in tpu_hosts or int(os.environ.get("SLURM_NTASKS", "1")) > 1
            or int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1)


def tpu_runtime_installed() -> bool:
    """Whether JAX's TPU runtime (libtpu, the `.[tpu]` extra) is installed; without it JAX runs on CPU."""
    import importlib.util
    return importlib.util.find_spec("libtpu") is not None


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, tpu: bool = False) -> bool:
    """Join the multi-host program if there is one; returns whether it did. `tpu`: --tpu was given."""
    import jax

    explicit = [coordinator_address, num_processes, process_id]
    if any(v is not None for v in explicit):
        if any(v is None for v in explicit):
            raise UserError("--coordinator_address, --num_processes and --process_id go together: give all three "
                            "(e.g. --coordinator_address 10.0.0.1:1234 --num_processes 2 --process_id 0)")
        if not 0 <= process_id < num_processes:
            raise UserError(f"--process_id {process_id} must be between 0 and --num_processes - 1 ({num_processes - 1})")
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
        return True
    if _launched_by_cluster():
        jax.distributed.initialize()  # TPU pods, SLURM and Open MPI describe themselves
        return True
    if tpu and tpu_runtime_installed():
        # A Cloud TPU VM sets no environment variable naming its slice's workers (GKE does); JAX reads
        # them from the VM's metadata, for one worker or many. Without libtpu, cli.check_tpu explains.
        try:
            jax.distributed.initialize()
        except (RuntimeError, ValueError) as e:
            raise UserError(f"--tpu: JAX could not join this TPU VM's workers ({str(e).splitlines()[0]}); run on the "
                            "Cloud TPU VM itself, on every worker of a pod slice at once, or drop --tpu") from None
        return True
    return False


def add_flags(parser) -> None:
    g = parser.add_argument_group("several hosts (TPU pods discover these themselves)")
    g.add_argument("--coordinator_address", help="host:port of process 0, reachable from every process")
    g.add_argument("--num_processes", type=int, help="number of processes (hosts) in the run")
    g.add_argument("--process_id", type=int, help="this process's index, 0 .. num_processes - 1")


# ---------------------------------------------------------------- stopping together
# A collective save hangs unless every host takes part, so hosts must agree on the step where
# a run stops. JAX's preemption service does that: its notifier catches SIGTERM (the preemption
# notice of TPU VMs, GKE and SLURM) on any host, the coordinator picks a step every host can
# still reach (the largest step any host is at, plus one), and reached_preemption_sync_point
# turns true at that step on every host.


def preemption_service() -> bool:
    """Whether this run has several hosts joined with JAX's preemption service on."""
    import jax
    if jax.process_count() == 1:
        return False
    try:  # JAX keeps the manager in its (private) distributed state; without it, no agreement is possible
        from jax._src import distributed as jax_distributed
    except ImportError:
        return False
    state = getattr(jax_distributed, "global_state", None)
    return getattr(state, "preemption_sync_manager", None) is not None


def reached_stop_point(step: int) -> bool:
    """True at the step all hosts agreed to stop at after one of them got SIGTERM (call every step)."""
    from jax.experimental import multihost_utils
    return multihost_utils.reached_preemption_sync_point(step)


def any_host(flag: bool) -> bool:
    """True on every host if `flag` is true on any (a collective: every host must call it)."""
    import jax
    import numpy as np
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils
    return bool(np.any(multihost_utils.process_allgather(np.array([flag], np.int32))))
