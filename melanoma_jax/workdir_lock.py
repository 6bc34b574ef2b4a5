"""One run per workdir: an exclusive lock held for the whole run.

Two runs writing the same workdir mix their histories and overwrite each
other's checkpoints and reports. On a local or NFS disk the run holds
`fcntl.flock` on `WORKDIR/.lock` and writes its PID and host there; a second
run is refused at once, naming them. The kernel releases the lock when its
holder dies, however it dies (`kill -9` included), so a lock left by a dead
run is simply taken over; the PID in the file is then only a stale record.

Object stores (`gs://`, `s3://`) have no locks: there the run logs a warning
and proceeds, and keeping to one job per workdir is up to the scheduler.
"""

import contextlib
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator

from absl import logging
from etils import epath

from melanoma_jax.errors import WorkdirBusyError

LOCK_FILE = '.lock'


def is_local(path: epath.Path) -> bool:
  """Whether `path` is on a file system with locks (not an object store such as gs://)."""
  return '://' not in str(path)


def _holder(fd: int) -> str:
  """Who holds the lock, as the holder recorded it."""
  try:
    os.lseek(fd, 0, os.SEEK_SET)
    info = json.loads(os.read(fd, 4096).decode() or '{}')
    return f"PID {info['pid']} on host {info['host']} (since {info['since']})"
  except (OSError, ValueError, KeyError):
    return 'another process (it has not recorded its PID yet)'


@contextlib.contextmanager
def hold(workdir: epath.PathLike, enabled: bool = True) -> Iterator[None]:
  """Holds the workdir's lock for the duration, creating the workdir if needed.

  Raises:
    WorkdirBusyError: another live process holds it.
  """
  workdir = epath.Path(workdir)
  if not enabled:
    yield
    return
  if not is_local(workdir):
    logging.warning('%s is not on a local or NFS disk: it cannot be locked, so make sure no other '
                    'run uses it at the same time.', workdir)
    yield
    return
  workdir.mkdir(parents=True, exist_ok=True)
  fd = os.open(workdir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      raise WorkdirBusyError(
          f'{workdir} is in use by another run: {_holder(fd)}. Wait for it to finish, stop it '
          '(SIGTERM saves and exits), or use another --workdir.') from None
    record = {'pid': os.getpid(), 'host': socket.gethostname(),
              'since': time.strftime('%Y-%m-%d %H:%M:%S %Z')}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(record).encode(), 0)
    yield
  finally:
    os.close(fd)  # releases the lock
