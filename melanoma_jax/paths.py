"""Paths users type, made absolute where they enter; URIs (gs://...) stay as they are."""

import os
import re

import ml_collections

# Config fields that name files or folders the user gives.
CONFIG_PATHS = ('data_dir', 'manual_dir', 'groups_csv')
_URI = re.compile(r'^[A-Za-z][A-Za-z0-9+.-]*://')


def user_path(path: str | None) -> str | None:
  """A path as the user typed it, made absolute: `~` expanded, relative to the current directory.

  Resolved once, where it enters, so the run records where it really is:
  orbax refuses relative checkpoint paths, and a rerun from another
  directory must name the same files. URIs (gs://bucket/...) stay as they are.
  """
  if path is None or _URI.match(path):
    return path
  return os.path.abspath(os.path.expanduser(path))


def resolve_config_paths(config: ml_collections.ConfigDict) -> None:
  """`user_path` on the config's path fields (data_dir, manual_dir, groups_csv), in place."""
  for field in CONFIG_PATHS:
    if config.get(field):
      config[field] = user_path(config[field])
