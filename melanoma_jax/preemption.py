"""Preemption: turn SIGTERM into a save at the next step boundary.

Cloud TPU and GPU jobs, and schedulers such as SLURM, send SIGTERM some
time before they kill a job. On one host a signal handler sets a flag; on
several hosts JAX's preemption sync service (through orbax) makes every
host agree on the same step to save at.

Outside the training loop (data loading, restoring, the final evaluation)
there is nothing new to save: there SIGTERM stops the run at once with
`Stopped`, which the run turns into a message and exit status 0.
"""

import contextlib

import signal
import threading
from types import TracebackType
from collections.abc import Iterator
from typing import Callable

import jax
import orbax.checkpoint as ocp
from absl import logging


class Stopped(Exception):
  """SIGTERM arrived where everything worth keeping was already saved."""


def _stop(signum: int, frame) -> None:
  del frame
  raise Stopped(f'signal {signum}')


@contextlib.contextmanager
def stop_on_sigterm() -> Iterator[None]:
  """SIGTERM raises `Stopped` for the duration (one process, main thread only).

  With several processes JAX's preemption service owns the signal, and the
  training loop's `PreemptionWatch` takes it over while steps run.
  """
  if jax.process_count() > 1 or threading.current_thread() is not threading.main_thread():
    yield
    return
  previous = signal.signal(signal.SIGTERM, _stop)
  try:
    yield
  finally:
    signal.signal(signal.SIGTERM, previous)


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
