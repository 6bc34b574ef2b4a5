"""Preemption: turn SIGTERM into a save at the next step boundary.

Cloud TPU and GPU jobs, and schedulers such as SLURM, send SIGTERM some
time before they kill a job. On one host a signal handler sets a flag; on
several hosts JAX's preemption sync service (through orbax) makes every
host agree on the same step to save at.
"""

import signal
import threading
from types import TracebackType
from typing import Callable

import jax
import orbax.checkpoint as ocp
from absl import logging


class PreemptionWatch:
  """Context manager yielding `preempted(step) -> bool`."""

  def __init__(self, manager: ocp.CheckpointManager):
    self._manager = manager
    self._signalled = threading.Event()
    self._previous = None

  def _handle(self, signum: int, frame) -> None:
    del frame
    logging.warning('Received signal %d: saving at the next step boundary.', signum)
    self._signalled.set()

  def preempted(self, step: int) -> bool:
    if jax.process_count() > 1:
      return self._manager.reached_preemption(step)
    return self._signalled.is_set()

  def __enter__(self) -> Callable[[int], bool]:
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self.preempted

  def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
               tb: TracebackType | None) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
