"""Batches drawn ahead on a thread are the epoch's batches, and its errors reach the caller."""

import jax
import numpy as np
import pytest

from melanoma_jax import input_pipeline


@pytest.fixture(scope='module')
def data(tiny_config):
  return input_pipeline.load_data(tiny_config)


def test_ahead_gives_the_same_batches_as_the_direct_stream(data, tiny_config):
  make = lambda: input_pipeline.train_dataset(data.train, tiny_config, 9, 2, 3, 1)
  ahead = input_pipeline.BatchesAhead(make)
  spec = ahead.element_spec()
  got = list(ahead.batches())
  want = list(input_pipeline.train_batches(data.train, tiny_config, 9, 2, 3, 1))
  assert len(got) == len(want) == 2
  for g, w in zip(got, want):
    assert g.keys() == w.keys() == spec.keys()
    for k in w:
      np.testing.assert_array_equal(g[k], w[k])
      assert tuple(spec[k].shape) == w[k].shape and spec[k].dtype.as_numpy_dtype == w[k].dtype
  assert got[0]['image'].shape[0] == jax.local_device_count()


def test_ahead_raises_the_pipelines_error_where_asked():
  def broken():
    raise ValueError('no such split')
  ahead = input_pipeline.BatchesAhead(broken)
  with pytest.raises(ValueError, match='no such split'):
    ahead.element_spec()
  with pytest.raises(ValueError, match='no such split'):
    ahead.batches()
