"""Checkpoints of a run's workdir: what is kept, saving, and restoring.

A workdir holds `config.json` (the run's config) and `checkpoints/`, orbax
checkpoints named by training step, each with the train state and a small
JSON `meta` (epoch, validation loss, class names, and the run's history up
to that checkpoint, so a checkpoint and its history rows are committed
together). The last few and the best by validation loss are kept.

A checkpoint whose files cannot be read is moved to `corrupt_checkpoints/`
and the one before it is used; a readable checkpoint that does not fit the
configured model or optimizer is never touched: the run is refused, naming
what differs.
"""

import json
import shutil
import time
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from melanoma_jax import errors, steps, workdir_lock

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
  _check_free_space(epath.Path(mngr.directory), state, meta)
  global_state = multihost_utils.host_local_array_to_global_array(state, _global_mesh(), P())
  try:
    mngr.save(int(state.step), metrics=metrics, args=ocp.args.Composite(
        state=ocp.args.StandardSave(global_state), meta=ocp.args.JsonSave(meta)))
    mngr.wait_until_finished()
  except Exception as error:  # orbax and TensorStore wrap ENOSPC in several kinds
    if 'No space left' in str(error) or 'RESOURCE_EXHAUSTED' in str(error):
      raise errors.DiskFullError(_disk_full_message(mngr, int(state.step))) from error
    raise


def _disk_full_message(mngr: ocp.CheckpointManager, step: int) -> str:
  latest = mngr.latest_step()
  kept = (f'the last checkpoint, step {latest}, is intact and a rerun of the same command '
          'resumes from it' if latest is not None else
          'no checkpoint was saved yet, so a rerun starts over')
  return (f'No space left on {mngr.directory} to save step {step}: {kept}. '
          'Free some space (or use another --workdir) and rerun.')


def _check_free_space(directory: epath.Path, state: steps.TrainState, meta: dict[str, Any]) -> None:
  """Refuses to start a save that cannot fit, before it writes anything."""
  if not workdir_lock.is_local(directory):
    return
  needed = sum(x.nbytes for x in jax.tree.leaves(state)) + len(json.dumps(meta)) + (1 << 20)
  free = shutil.disk_usage(directory).free
  if free < needed:
    raise errors.DiskFullError(
        f'Not enough space on {directory} to save step {int(state.step)}: it needs about '
        f'{needed / 2**20:.1f} MiB and {free / 2**20:.1f} MiB are free. Nothing saved before is '
        'touched: free some space (or use another --workdir) and rerun the same command to resume.')


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
  """Only the JSON metadata of a checkpoint (epoch, val_loss, class_names, history)."""
  return mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta


def _shapes(tree: Any) -> dict[str, tuple[tuple[int, ...], str]]:
  """'path/of/leaf' -> (shape, dtype) for every array of a state or its on-disk metadata."""
  flat = ocp.tree.to_flat_dict(tree)
  return {'/'.join(map(str, path)): (tuple(leaf.shape), str(leaf.dtype))
          for path, leaf in flat.items() if hasattr(leaf, 'shape')}


def layout_difference(mngr: ocp.CheckpointManager, step: int, state: steps.TrainState) -> str | None:
  """What differs between the arrays saved at `step` and those of `state`; None if they fit.

  Reads only the checkpoint's metadata; raises whatever orbax raises when
  that cannot be read.
  """
  on_disk = _shapes(ocp.StandardCheckpointHandler().metadata(
      epath.Path(mngr.directory) / str(step) / 'state').tree)
  configured = _shapes(ocp.tree.serialize_tree(state, keep_empty_nodes=True))
  # Checkpoints written before the generic `model_state` kept BatchNorm
  # statistics in a `batch_stats` field; `restore` reads them as they are.
  legacy = 'batch_stats/'
  on_disk = {('model_state/' + k if k.startswith(legacy) else k): v for k, v in on_disk.items()}
  only_saved = sorted(on_disk.keys() - configured.keys())
  only_configured = sorted(configured.keys() - on_disk.keys())
  reshaped = [f'{k} is {on_disk[k][1]}{list(on_disk[k][0])} in the checkpoint but '
              f'{configured[k][1]}{list(configured[k][0])} now'
              for k in sorted(on_disk.keys() & configured.keys()) if on_disk[k] != configured[k]]
  parts = []
  if only_saved:
    parts.append(f'{len(only_saved)} arrays only in the checkpoint (e.g. {only_saved[0]})')
  if only_configured:
    parts.append(f'{len(only_configured)} arrays only in the configured model/optimizer '
                 f'(e.g. {only_configured[0]})')
  if reshaped:
    parts.append(f'{len(reshaped)} arrays of another shape or dtype (e.g. {reshaped[0]})')
  return '; '.join(parts) or None


def write_config(workdir: epath.PathLike, config: ml_collections.ConfigDict) -> None:
  """Records the run's config; called once the run has started (data loaded, state restored)."""
  if jax.process_index() == 0:
    path = epath.Path(workdir) / CONFIG_FILE
    tmp = path.parent / (CONFIG_FILE + '.tmp')
    tmp.write_text(config.to_json(indent=2))
    tmp.replace(path)


def read_config(workdir: epath.PathLike) -> ml_collections.ConfigDict:
  path = epath.Path(workdir) / CONFIG_FILE
  if not path.exists():
    raise FileNotFoundError(f'{path} not found: {workdir} does not hold a training run.')
  return ml_collections.ConfigDict(json.loads(path.read_text()))


# Config fields a rerun may change and still resume the same run: they shape
# neither the train state nor the run's data (lowering `learning_rate` is the
# way past a divergence). Every other field, including any a model, optimizer
# or dataset adds later, is part of the run's identity: a rerun that changes
# it is refused while the workdir holds checkpoints.
FREE_TO_CHANGE = ('num_epochs', 'data_dir', 'manual_dir', 'learning_rate', 'log_every_steps',
                  'checkpoints_to_keep', 'checkpoint_every_steps', 'skip_nonfinite_steps',
                  'target_sensitivity', 'model.conv_impl', 'model.dtype',
                  'model.init_from', 'streaming')  # init_from: only read when there is no checkpoint yet


def _flatten(tree: dict[str, Any], prefix: str = '') -> dict[str, Any]:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(_flatten(value, f'{prefix}{key}.'))
    else:
      flat[f'{prefix}{key}'] = value
  return flat


def identity_changes(previous: dict[str, Any], config: ml_collections.ConfigDict) -> list[str]:
  """'field: old -> new' for each identity field that differs.

  Fields one side lacks (added or removed since the run started) do not count.
  """
  old, new = _flatten(previous), _flatten(json.loads(config.to_json()))
  free = lambda key: any(key == f or key.startswith(f + '.') for f in FREE_TO_CHANGE)
  return [f'{key}: {old[key]!r} -> {new[key]!r}' for key in sorted(old.keys() & new.keys())
          if not free(key) and old[key] != new[key]]


def has_checkpoints(workdir: epath.PathLike) -> bool:
  folder = epath.Path(workdir) / 'checkpoints'
  return folder.is_dir() and any(p.name.isdigit() for p in folder.iterdir())


def unique_path(path: epath.Path) -> epath.Path:
  """`path`, or `path-2`, `path-3`, ...: the first that does not exist yet."""
  candidate, n = path, 1
  while candidate.exists():
    n += 1
    candidate = path.parent / f'{path.name}-{n}'
  return candidate


def check_workdir(workdir: epath.PathLike, config: ml_collections.ConfigDict, start_over: bool) -> None:
  """Refuses a workdir whose checkpoints belong to a different run; writes nothing else.

  With `start_over`, whatever the workdir holds is moved aside to
  `previous_runs/<time>/`, never deleted. The config is written later
  (`write_config`), once the run has started, so a failed start leaves no
  config that would refuse the corrected command.
  """
  workdir = epath.Path(workdir)
  config_file = workdir / CONFIG_FILE
  if start_over:
    items = [item for item in workdir.iterdir() if item.name not in ('previous_runs', workdir_lock.LOCK_FILE)
             ] if workdir.is_dir() else []
    if items and jax.process_index() == 0:
      aside = unique_path(workdir / 'previous_runs' / time.strftime('%Y%m%d-%H%M%S'))
      aside.mkdir(parents=True)
      for item in items:
        item.rename(aside / item.name)
      logging.warning('Moved the previous run in %s to %s.', workdir, aside)
  elif config_file.exists() and has_checkpoints(workdir):
    changed = identity_changes(json.loads(config_file.read_text()), config)
    if changed:
      raise errors.ConfigError(
          f'{workdir} holds a run of a different model, optimizer or data ({"; ".join(changed)}). '
          'Rerun with its settings to resume it, use another --workdir, or pass --start_over to '
          'move the old run aside.')
  workdir.mkdir(parents=True, exist_ok=True)


def restore_latest(mngr: ocp.CheckpointManager, state: steps.TrainState,
                   workdir: epath.PathLike) -> tuple[steps.TrainState, dict[str, Any]]:
  """The newest checkpoint that restores, or (`state`, {}) when there is none.

  A checkpoint whose files cannot be read (truncated or deleted) is moved to
  `corrupt_checkpoints/` with a warning, and the one before it is tried.

  Raises:
    CheckpointMismatchError: a readable checkpoint holds other arrays than
      `state` (another model, head or optimizer); nothing is moved.
  """
  for step in sorted(mngr.all_steps(), reverse=True):
    try:
      difference = layout_difference(mngr, step, state)
      if difference is None:
        return restore(mngr, step, state)
    except Exception as error:  # pylint: disable=broad-except  # orbax raises many kinds
      _move_aside(mngr, step, workdir, error)
      continue
    raise errors.CheckpointMismatchError(
        f'Checkpoint {step} in {mngr.directory} does not fit the model and optimizer configured now: '
        f'{difference}. Rerun with the settings the run was started with (see '
        f'{epath.Path(workdir) / CONFIG_FILE}), or pass --start_over to move the old run aside and '
        'start anew.')
  return state, {}


def restore_step(mngr: ocp.CheckpointManager, step: int, state_fn: Callable[[dict[str, Any]], Any]
                 ) -> tuple[steps.TrainState, dict[str, Any]]:
  """Checkpoint `step` for reading (inference, evaluation); `state_fn(meta)` gives its template.

  Raises:
    CheckpointUnreadableError, CheckpointMismatchError: naming the checkpoint
      and the steps to choose from with --step.
  """
  others = f'kept steps: {sorted(mngr.all_steps())}; choose one with --step'
  try:
    state = state_fn(read_meta(mngr, step))
    difference = layout_difference(mngr, step, state)
    if difference is None:
      return restore(mngr, step, state)
  except Exception as error:  # pylint: disable=broad-except  # orbax and TensorStore raise many kinds
    raise errors.CheckpointUnreadableError(
        f'Checkpoint {step} in {mngr.directory} cannot be read ({type(error).__name__}: '
        f'{str(error).split(" See full")[0][:200]}); {others}.') from error
  raise errors.CheckpointMismatchError(
      f'Checkpoint {step} in {mngr.directory} does not fit the run\'s config.json: {difference}; {others}.')


def _move_aside(mngr: ocp.CheckpointManager, step: int, workdir: epath.PathLike,
                error: Exception) -> None:
  """Moves an unreadable checkpoint to `corrupt_checkpoints/`, under a name not taken yet."""
  aside = unique_path(epath.Path(workdir) / 'corrupt_checkpoints' / str(step))
  logging.warning('Checkpoint %d in %s cannot be read (%s: %s); moving it to %s and '
                  'falling back to the previous one.', step, mngr.directory, type(error).__name__,
                  str(error)[:300], aside)
  if jax.process_index() == 0:
    aside.parent.mkdir(parents=True, exist_ok=True)
    (epath.Path(mngr.directory) / str(step)).rename(aside)
  mngr.reload()
