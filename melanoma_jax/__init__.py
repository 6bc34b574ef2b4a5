"""melanoma_jax: train, evaluate and deploy skin-lesion classifiers with JAX."""

from melanoma_jax.steps import TrainState, create_train_state, eval_step, predict, train_step

__all__ = ['TrainState', 'create_train_state', 'eval_step', 'predict', 'train_step']
