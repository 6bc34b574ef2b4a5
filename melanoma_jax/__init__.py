"""melanoma_jax: train, evaluate and deploy skin-lesion classifiers with JAX."""

__all__ = ['TrainState', 'create_train_state', 'eval_step', 'predict', 'train_step']


def __getattr__(name: str):
  """The step functions, imported on first use so `melanoma_jax.runtime` loads without JAX."""
  if name in __all__:
    from melanoma_jax import steps  # pylint: disable=g-import-not-at-top
    return getattr(steps, name)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
