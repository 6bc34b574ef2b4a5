"""Small JSON files a run keeps beside its checkpoints (operating point, calibration).

Written by process 0 only; `None` removes a stale file, so a reader never
takes an old run's threshold or temperature for this one's.
"""

import json
from typing import Any

import jax
from etils import epath


def write_json(workdir: epath.PathLike, name: str, content: dict[str, Any] | None) -> None:
  if jax.process_index() != 0:
    return
  path = epath.Path(workdir) / name
  if content is None:
    path.unlink(missing_ok=True)
  else:
    path.write_text(json.dumps(content, indent=2))


def read_json(workdir: epath.PathLike, name: str) -> dict[str, Any] | None:
  path = epath.Path(workdir) / name
  return json.loads(path.read_text()) if path.exists() else None
