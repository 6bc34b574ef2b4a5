"""Multi-host start-up: one process per host, joined through jax.distributed.

Must run before anything touches a JAX device. On TPU VMs and under SLURM,
`jax.distributed.initialize()` finds the coordinator and process ids by
itself; elsewhere they are given explicitly.
"""

import jax
from absl import logging


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
