"""Errors that mean "the user must change something", with messages that say what.

Every one derives from `UserError`: the command-line tools print its message
as one line (`Error: ...`) and exit 1, with no traceback on the console.
Each message names what to change; nothing already saved is lost.
"""

import errno
import sys
from typing import NoReturn


class UserError(Exception):
  """A failure the user caused and can fix; the message says how."""


class ConfigError(UserError, ValueError):
  """A configuration that cannot run; the message says which field to change."""


class DataError(UserError, ValueError):
  """A dataset that cannot be used as configured; the message says why."""


class DatasetLayoutError(UserError, ValueError):
  """The data on disk is not laid out as the builder expects."""


class WorkdirBusyError(UserError):
  """Another live process holds the workdir's lock."""


class CheckpointMismatchError(UserError):
  """A readable checkpoint that does not fit the configured model or optimizer."""


class CheckpointUnreadableError(UserError):
  """A checkpoint whose files cannot be read (truncated, deleted, corrupt)."""


class DiskFullError(UserError, OSError):
  """Not enough free space to save; nothing saved before is touched."""


class EnsembleError(UserError, ValueError):
  """Runs that cannot be combined as asked; the message says why."""


class UnreadableImageError(UserError, ValueError):
  """An image file cannot be decoded; preparation skips it, prediction reports it."""


def user_message(error: BaseException) -> str | None:
  """The one line to show for a failure the user can fix; None for a bug (show the traceback).

  A full disk may surface as any OSError with ENOSPC, anywhere in the chain
  of causes (TensorStore and TFDS wrap it).
  """
  if isinstance(error, (UserError, FloatingPointError)):
    return str(error)
  seen = error
  while seen is not None:
    if isinstance(seen, OSError) and seen.errno == errno.ENOSPC:
      where = f' writing {seen.filename}' if seen.filename else ''
      return (f'No space left on device{where}. Nothing saved before is lost: free some space '
              '(or use another --workdir) and rerun the same command to resume.')
    seen = seen.__cause__ or seen.__context__
  return None


def exit_with(message: str) -> NoReturn:
  """Exits 1 with `Error: message` as the console's last line.

  Orbax leaves coroutines of a failed read or write behind; Python would
  print each one's traceback at exit, after the message, so they are dropped.
  """
  sys.unraisablehook = lambda unraisable: None
  raise SystemExit(f'Error: {message}')
