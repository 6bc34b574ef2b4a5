"""Checkpoints of a run's workdir: what is kept, saving, and restoring.

A workdir holds `config.json` (the run's config) and `checkpoints/`, orbax
checkpoints named by training step, each with the train state and a small
JSON `meta` (epoch, validation loss, class names). The last few and the
best by validation loss are kept.
"""

import json
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath

from melanoma_jax import steps

CONFIG_FILE = 'config.json'


def manager(workdir: epath.PathLike, keep: int = 3) -> ocp.CheckpointManager:
  """Keeps the last `keep` checkpoints and the one of lowest validation loss."""
  policy = ocp.checkpoint_managers.AnyPreservationPolicy([
      ocp.checkpoint_managers.LatestN(n=keep),
      ocp.checkpoint_managers.BestN(get_metric_fn=lambda m: -m['val_loss'], n=1),
  ])
  return ocp.CheckpointManager(
      epath.Path(workdir) / 'checkpoints', item_names=('state', 'meta'),
      # best_fn also makes orbax persist the metrics, so the policy and
      # best_step() still know them after a restart.
      options=ocp.CheckpointManagerOptions(preservation_policy=policy, best_fn=lambda m: m['val_loss'],
                                           best_mode='min', create=True))


def save(mngr: ocp.CheckpointManager, state: steps.TrainState, meta: dict[str, Any]) -> None:
  """Saves and waits for the commit, so a crash never leaves this one half-written."""
  mngr.save(int(state.step), metrics={'val_loss': meta['val_loss']}, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))
  mngr.wait_until_finished()


def restore(mngr: ocp.CheckpointManager, step: int,
            state: steps.TrainState) -> tuple[steps.TrainState, dict[str, Any]]:
  """The state saved at `step`, in the structure (and static fields) of `state`."""
  restored = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(state), meta=ocp.args.JsonRestore()))
  return restored.state, restored.meta


def read_meta(mngr: ocp.CheckpointManager, step: int) -> dict[str, Any]:
  """Only the JSON metadata of a checkpoint (epoch, val_loss, class_names)."""
  return mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta


def write_config(workdir: epath.PathLike, config: ml_collections.ConfigDict) -> None:
  if jax.process_index() == 0:
    (epath.Path(workdir) / CONFIG_FILE).write_text(config.to_json(indent=2))


def read_config(workdir: epath.PathLike) -> ml_collections.ConfigDict:
  path = epath.Path(workdir) / CONFIG_FILE
  if not path.exists():
    raise FileNotFoundError(f'{path} not found: {workdir} does not hold a training run.')
  return ml_collections.ConfigDict(json.loads(path.read_text()))
