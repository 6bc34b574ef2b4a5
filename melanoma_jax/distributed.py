"""Multi-host start-up: one process per host, joined through jax.distributed.

Must run before anything touches a JAX device. On TPU VMs and under SLURM,
`jax.distributed.initialize()` finds the coordinator and process ids by
itself; elsewhere they are given explicitly.
"""

import jax
from absl import logging
from jax.experimental import multihost_utils
from orbax.checkpoint import multihost as orbax_multihost


def initialize(coordinator_address: str | None, num_processes: int | None,
               process_id: int | None, auto: bool) -> None:
  """Joins the job's processes; does nothing for a single-process run."""
  explicit = (coordinator_address, num_processes, process_id)
  if any(v is not None for v in explicit) and None in explicit:
    raise ValueError('--coordinator_address, --num_processes and --process_id go together.')
  if not auto and coordinator_address is None:
    return
  # CPU processes exchange gradients through gloo (GPU uses NCCL, TPU its ICI).
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id)
  logging.info('Process %d of %d; %d local of %d devices.', jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count())


def wait_for_all_processes(name: str, timeout_minutes: int = 30) -> None:
  """Lines the processes up, then makes one collective.

  Gloo builds its communication context at the first collective and gives
  up when a peer is 30 s late, as a slower host still loading data or
  compiling can be; a barrier of the coordination service waits longer
  (JAX has no public one; orbax's is public and kept up with JAX).
  """
  if jax.process_count() == 1:
    return
  orbax_multihost.get_barrier_sync_fn()(key=name, timeout_ms=timeout_minutes * 60_000)
  multihost_utils.sync_global_devices(name)
