"""A model's layer table, as Keras' `model.summary()` prints it, for any flax module.

Each row is one call of a submodule, in call order: its path and type, its
output shape (batch dimension None) and the variables it holds itself, of
every collection (BatchNorm's running statistics count, as in Keras, as
non-trainable). The shapes come from `jax.eval_shape`, so nothing is
computed or allocated, whatever the model's size.
"""

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

TRAINABLE = 'params'  # The collection the optimizer updates; every other is non-trainable.


def _calls_and_variables(model: nn.Module, input_shape: Sequence[int], input_dtype: Any,
                         call_kwargs: dict[str, Any]) -> tuple[list[list[Any]], dict[tuple[str, ...], Any]]:
  """([path, type name, output shapes] per submodule call, flat variables), shapes only."""
  calls = []

  def record(next_fun, args, kwargs, context):
    if context.method_name != '__call__' or not context.module.path:
      return next_fun(*args, **kwargs)
    call = [context.module.path, type(context.module).__name__, None]
    calls.append(call)  # Before running it, so a parent precedes its children.
    out = next_fun(*args, **kwargs)
    call[2] = [tuple(leaf.shape) for leaf in jax.tree.leaves(out)]
    return out

  def init():
    with nn.intercept_methods(record):
      return model.init(jax.random.key(0), jnp.zeros((1, *input_shape), input_dtype), **call_kwargs)

  variables = jax.eval_shape(init)
  return calls, traverse_util.flatten_dict(variables)


def _shape(shapes: Sequence[tuple[int, ...]] | None) -> str:
  text = ', '.join(str((None, *shape[1:])) if shape else '()' for shape in shapes or ())
  return text.replace('None,)', 'None)') or '?'


def _amount(count: int, num_bytes: int) -> str:
  for unit, size in (('GB', 2**30), ('MB', 2**20), ('KB', 2**10)):
    if num_bytes >= size:
      return f'{count:,} ({num_bytes / size:.2f} {unit})'
  return f'{count:,} ({num_bytes} B)'


def layer_table(model: nn.Module, input_shape: Sequence[int], input_dtype: Any = jnp.uint8,
                **call_kwargs: Any) -> str:
  """The table for inputs of `input_shape` (one example, no batch); `call_kwargs` go to the call, e.g. train=False."""
  calls, variables = _calls_and_variables(model, input_shape, input_dtype, call_kwargs)
  held = {}  # module path -> [count, trainable count, bytes]
  for (collection, *path, _), leaf in variables.items():
    totals = held.setdefault(tuple(path), [0, 0, 0])
    totals[0] += leaf.size
    totals[1] += leaf.size if collection == TRAINABLE else 0
    totals[2] += leaf.size * np.dtype(leaf.dtype).itemsize
  rows, counted = [], set()
  for path, type_name, shapes in calls:
    count = held[path][0] if path in held and path not in counted else 0
    counted.add(path)
    rows.append((f'{"/".join(path)} ({type_name})', _shape(shapes), f'{count:,}'))
  # Variables of modules only reached through other methods than __call__.
  rows += [(f'{"/".join(path)} (?)' if path else f'(top) ({type(model).__name__})', '?', f'{totals[0]:,}')
           for path, totals in held.items() if path not in counted]
  total, trainable, num_bytes = (sum(t[i] for t in held.values()) for i in range(3))
  trainable_bytes = sum(leaf.size * np.dtype(leaf.dtype).itemsize for key, leaf in variables.items()
                        if key[0] == TRAINABLE)
  header = ('Layer (type)', 'Output Shape', 'Param #')
  widths = [max(len(r[i]) for r in [header, *rows]) + 3 for i in range(3)]
  line = lambda cells: ' ' + ''.join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
  rule = sum(widths) + 1
  return '\n'.join([
      f'Model: "{type(model).__name__}"', '_' * rule, line(header), '=' * rule,
      *(line(row) for row in rows), '=' * rule,
      f'Total params: {_amount(total, num_bytes)}',
      f'Trainable params: {_amount(trainable, trainable_bytes)}',
      f'Non-trainable params: {_amount(total - trainable, num_bytes - trainable_bytes)}',
      '_' * rule])
