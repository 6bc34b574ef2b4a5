"""Checkpoints of a run's workdir: what is kept, saving, and restoring.

A workdir holds `config.json` (the run's config) and `checkpoints/`, orbax
checkpoints named by training step, each with the train state and a small
JSON `meta` (epoch, validation loss, class names). The last few and the
best by validation loss are kept.
"""

import json
import time
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from melanoma_jax import errors, steps

CONFIG_FILE = 'config.json'


def manager(workdir: epath.PathLike, keep: int = 3) -> ocp.CheckpointManager:
  """Keeps the last `keep` checkpoints and the one of lowest validation loss."""
  # Mid-epoch checkpoints have no validation loss: only LatestN keeps them.
  policy = ocp.checkpoint_managers.AnyPreservationPolicy([
      ocp.checkpoint_managers.LatestN(n=keep),
      ocp.checkpoint_managers.BestN(get_metric_fn=lambda m: -m['val_loss'], n=1,
                                    keep_checkpoints_without_metrics=False),
  ])
  return ocp.CheckpointManager(
      epath.Path(workdir) / 'checkpoints', item_names=('state', 'meta'),
      # best_fn also makes orbax persist the metrics, so the policy and
      # best_step() still know them after a restart.
      options=ocp.CheckpointManagerOptions(preservation_policy=policy, best_fn=lambda m: m['val_loss'],
                                           best_mode='min',
                                           keep_checkpoints_without_metrics=False, create=True))


def save(mngr: ocp.CheckpointManager, state: steps.TrainState, meta: dict[str, Any]) -> None:
  """Saves and waits for the commit; `meta['val_loss']` marks an epoch-end checkpoint.

  Orbax writes to a temporary directory and renames it when complete, so a
  crash mid-save never replaces a good checkpoint with a partial one.
  """
  metrics = {'val_loss': meta['val_loss']} if 'val_loss' in meta else None
  global_state = multihost_utils.host_local_array_to_global_array(state, _global_mesh(), P())
  mngr.save(int(state.step), metrics=metrics, args=ocp.args.Composite(
      state=ocp.args.StandardSave(global_state), meta=ocp.args.JsonSave(meta)))
  mngr.wait_until_finished()


def restore(mngr: ocp.CheckpointManager, step: int,
            state: steps.TrainState) -> tuple[steps.TrainState, dict[str, Any]]:
  """The state saved at `step`, in the structure (and static fields) of `state`.

  Every host restores the same replicated state onto its own devices.
  """
  replicated = NamedSharding(_global_mesh(), P())
  template = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), state)
  restore_args = lambda tree: ocp.args.Composite(state=ocp.args.StandardRestore(tree), meta=ocp.args.JsonRestore())
  try:
    restored = mngr.restore(step, args=restore_args(template))
    global_state = restored.state
  except ValueError:
    if set(state.model_state) != {'batch_stats'}:
      raise
    # Checkpoints written before the generic `model_state` kept BatchNorm
    # statistics in a `batch_stats` field of the state.
    fields = ('step', 'params', 'opt_state', 'rng')
    legacy = {**{f: getattr(template, f) for f in fields}, 'batch_stats': template.model_state['batch_stats']}
    restored = mngr.restore(step, args=restore_args(legacy))
    global_state = template.replace(**{f: restored.state[f] for f in fields},
                                    model_state={'batch_stats': restored.state['batch_stats']})
  local = multihost_utils.global_array_to_host_local_array(global_state, _global_mesh(), P())
  return local, restored.meta


def _global_mesh() -> Mesh:
  """All devices of all hosts: orbax saves arrays that span every process."""
  return Mesh(np.array(jax.devices()), ('devices',))


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


# Config fields that make a workdir's checkpoints a different model or data.
RUN_IDENTITY = ('dataset', 'task', 'image_size', 'model.name', 'model.num_outputs', 'groups_csv',
                'val_fraction', 'seed')


def _field(config: ml_collections.ConfigDict | dict, dotted: str) -> Any:
  for key in dotted.split('.'):
    config = config.get(key) if config is not None else None
  return config


def claim_workdir(workdir: epath.PathLike, config: ml_collections.ConfigDict, start_over: bool) -> None:
  """Creates the workdir for `config`, refusing one that holds a different run.

  With `start_over`, an existing run is moved aside to `previous_runs/`, not
  deleted.
  """
  workdir = epath.Path(workdir)
  config_file = workdir / CONFIG_FILE
  if config_file.exists():
    previous = json.loads(config_file.read_text())
    changed = [f'{f}: {_field(previous, f)!r} -> {_field(config, f)!r}' for f in RUN_IDENTITY
               if _field(previous, f) != _field(config, f)]
    if changed and not start_over:
      raise errors.ConfigError(f'{workdir} holds a run of a different model or data ({"; ".join(changed)}). '
                        'Use another --workdir, or pass --start_over to move the old run aside.')
    if start_over and jax.process_index() == 0:
      aside = workdir / 'previous_runs' / time.strftime('%Y%m%d-%H%M%S')
      aside.mkdir(parents=True)
      for item in workdir.iterdir():
        if item.name != 'previous_runs':
          item.rename(aside / item.name)
      logging.warning('Moved the previous run in %s to %s.', workdir, aside)
  workdir.mkdir(parents=True, exist_ok=True)
  write_config(workdir, config)


def restore_latest(mngr: ocp.CheckpointManager, state: steps.TrainState,
                   workdir: epath.PathLike) -> tuple[steps.TrainState, dict[str, Any]]:
  """The newest checkpoint that restores, or (`state`, {}) when there is none.

  A checkpoint that fails to restore (truncated or deleted files) is moved
  to `corrupt_checkpoints/` with a warning, and the one before it is tried.
  """
  for step in sorted(mngr.all_steps(), reverse=True):
    try:
      return restore(mngr, step, state)
    except Exception as error:  # pylint: disable=broad-except  # orbax raises many kinds
      aside = epath.Path(workdir) / 'corrupt_checkpoints' / str(step)
      logging.warning('Checkpoint %d in %s does not restore (%s: %s); moving it to %s and '
                      'falling back to the previous one.', step, mngr.directory, type(error).__name__,
                      str(error)[:300], aside)
      if jax.process_index() == 0:
        aside.parent.mkdir(parents=True, exist_ok=True)
        (epath.Path(mngr.directory) / str(step)).rename(aside)
      mngr.reload()
  return state, {}
