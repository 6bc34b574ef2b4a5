"""What the command-line tools share: one flag convention, and a trained run's restore.

Every command takes absl flags, as launch.py does: `--name=value` or
`--name value`, `--flag`/`--noflag` for booleans, a flag that takes several
values repeated (`--workdir=A --workdir=B`). `--help` lists the command's
flags with their help, `--helpfull` adds absl's own; both exit 0. A command
line that cannot run (an unknown flag, a value out of range, a missing
required flag, a stray argument) ends with one `Error: ...` line and exit
status 1, as every failure the user can fix does.

launch.py and the benchmarks use absl's global flags through `run`. The
tools (evaluate, inference, saliency) keep theirs in a FlagValues of their
own, so that they can be imported into one process (tests) beside each other
and launch.py, and `main(argv)` parses the arguments it is given (`parse`).
"""

import math
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NoReturn

import ml_collections
from absl import app, flags

from melanoma_jax import errors, paths

if TYPE_CHECKING:  # JAX loads only once runtime.configure has set its flags.
  from melanoma_jax import steps

# Flags defined by the functions below belong to the command that calls them (its --help).
flags.disclaim_key_flags()

# Help flag -> what it lists: the command's own flags, or all (absl's --flagfile and --undefok too).
_HELP = {'help': 'own', 'helpshort': 'own', '?': 'own', 'h': 'own', 'helpfull': 'all'}


def _help_asked(args: Sequence[str]) -> str | None:
  """'own' or 'all' when the arguments (before a `--`) ask for help, else None."""
  for arg in args:
    if arg == '--':
      return None
    name, _, value = arg.lstrip('-').partition('=')
    if arg.startswith('-') and name in _HELP and value.lower() not in ('false', '0'):
      return _HELP[name]
  return None


def _bad_command_line(message: Any) -> NoReturn:
  errors.exit_with(f'{message} (--help lists the flags)')


def _no_such_config_field(error: AttributeError, argv: Sequence[str]) -> str:
  """The line for ml_collections' error on an override (`--config.model.nmae=...`) naming no field.

  Re-raises `error` when no override on the command line names its field.
  """
  cause = error.args[0] if error.args else error  # ml_collections: the KeyError, its text quoted
  lines = str(cause.args[0] if isinstance(cause, KeyError) and cause.args else cause).splitlines() or ['']
  field = lines[0].strip('\'"')
  names = [arg.split('=')[0] for arg in argv if arg.startswith('--')]
  flag = next((name for name in names if '.' in name and field in name.split('.')[1:]), None)
  if flag is None:
    raise error
  hint = f' ({lines[1].strip()})' if len(lines) > 1 else ''
  return f'{flag}: the config has no field {field!r}{hint}'


def run(main: Callable[[list[str]], None]) -> None:
  """`app.run(main)` on absl's global flags, with the tools' conventions.

  absl exits 1 after --help, as after an error, and prints the usage before
  a usage error; here help exits 0 and an error is one line.
  """
  def parse_global_flags(argv: list[str]) -> list[str]:
    shown = _help_asked(argv[1:])
    if shown:
      app.usage(shorthelp=shown == 'own', writeto_stdout=True, exitcode=0)
    try:
      return flags.FLAGS(argv)
    except flags.Error as e:
      _bad_command_line(e)
    except AttributeError as e:
      _bad_command_line(_no_such_config_field(e, argv))

  def main_with_usage_errors(argv: list[str]) -> None:
    try:
      main(argv)
    except app.UsageError as e:
      _bad_command_line(e)

  app.run(main_with_usage_errors, flags_parser=parse_global_flags)


def parse(flag_values: flags.FlagValues, argv: Sequence[str] | None, doc: str,
          positional: str | None = None) -> list[str]:
  """Parses a tool's arguments (`argv` without the program name; default the command line's).

  Returns the positional arguments: one or more, named `positional` in
  errors, or none when it is None. `doc` heads --help.
  """
  argv = sys.argv[1:] if argv is None else list(argv)
  shown = _help_asked(argv)
  if shown:
    print(f'{doc}\nflags:\n{flag_values.get_help(include_special_flags=shown == "all")}\n')
    sys.exit(0)
  flag_values.unparse_flags()  # Each call starts from the defaults.
  try:
    args = flag_values(['', *argv])[1:]
  except flags.Error as e:
    _bad_command_line(e)
  if positional is None and args:
    _bad_command_line(f'Unexpected arguments {args}: a value goes with its flag (--name=value), and a '
                      'flag with several values is repeated (--workdir=A --workdir=B)')
  if positional is not None and not args:
    _bad_command_line(f'Give at least one {positional}')
  return args


class _PathParser(flags.ArgumentParser):
  """A path the user typed, made absolute where it enters (`paths.user_path`)."""

  def parse(self, argument: str) -> str | None:
    return paths.user_path(argument)

  def flag_type(self) -> str:
    return 'path'


def define_path(name: str, help_text: str, flag_values: flags.FlagValues, required: bool = False,
                several: bool = False) -> None:
  """A flag naming a file or folder (`several`: repeatable); see `paths.user_path`."""
  if several:
    flags.DEFINE_multi(_PathParser(), flags.ArgumentSerializer(), name, None, help_text,
                       flag_values=flag_values, required=required)
  else:
    flags.DEFINE(_PathParser(), name, None, help_text, flag_values=flag_values, required=required)


def define_probability(name: str, help_text: str, flag_values: flags.FlagValues) -> None:
  """An optional float flag in [0, 1] (NaN is not)."""
  flags.DEFINE_float(name, None, help_text, lower_bound=0, upper_bound=1, flag_values=flag_values)
  flags.register_validator(name, lambda value: value is None or not math.isnan(value),
                           f'--{name} must be a number in [0, 1]', flag_values=flag_values)


def define_run_flags(flag_values: flags.FlagValues, several: bool = False) -> None:
  """--workdir (the run; `several`: one or more) and --step."""
  define_path('workdir', 'The training run (launch.py --workdir)' + (
      '; several (repeated), or a cross-validation run (launch.py --all_folds), make an ensemble.'
      if several else '.'), flag_values, required=True, several=several)
  flags.DEFINE_integer('step', None, 'Checkpoint step; default: the best by validation loss.',
                       lower_bound=0, flag_values=flag_values)


def restore(workdir: str, step: int | None
            ) -> tuple['steps.TrainState', ml_collections.ConfigDict, dict[str, Any]]:
  """(state, config, meta) of the run's checkpoint (`step`, default the best), or exit with the reason."""
  # TensorFlow only decodes data here: keep it off the accelerators JAX uses.
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], 'GPU')
  from melanoma_jax import train  # pylint: disable=g-import-not-at-top
  try:
    return train.restore_for_inference(workdir, step)
  except (FileNotFoundError, errors.UserError) as e:
    errors.exit_with(str(e))


def stored_image_size(config: ml_collections.ConfigDict, meta: dict[str, Any]) -> int:
  """The side the run's dataset stored images at, which files are decoded to before resizing.

  Runs from before it was recorded decode files straight to `image_size`.
  """
  return meta.get('stored_image_size') or config.image_size
