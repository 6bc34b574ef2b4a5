"""Paths users type: relative to where they are, `~` for home, URLs untouched."""

import ml_collections

from melanoma_jax import paths


def test_user_paths_become_absolute_and_urls_stay(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  monkeypatch.setenv('HOME', str(tmp_path / 'home'))
  assert paths.user_path('runs/x') == str(tmp_path / 'runs' / 'x')
  assert paths.user_path('./runs/../runs/x/') == str(tmp_path / 'runs' / 'x')
  assert paths.user_path('~/data') == str(tmp_path / 'home' / 'data')
  assert paths.user_path('/abs/path') == '/abs/path'
  for url in ('gs://bucket/runs/x', 's3://bucket/x', 'hdfs://node:9000/x'):
    assert paths.user_path(url) == url
  assert paths.user_path(None) is None


def test_config_paths_resolve_in_place(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  config = ml_collections.ConfigDict(
      {'data_dir': 'tfds', 'manual_dir': 'gs://bucket/isic', 'groups_csv': None, 'dataset': 'isic'})
  paths.resolve_config_paths(config)
  assert config.to_dict() == {'data_dir': str(tmp_path / 'tfds'), 'manual_dir': 'gs://bucket/isic',
                              'groups_csv': None, 'dataset': 'isic'}
