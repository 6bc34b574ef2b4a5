"""One flag convention for every command: absl flags, --help that lists them, one-line errors."""

import os
import pathlib
import re
import subprocess
import sys

import pytest

from melanoma_jax import cli, evaluate, inference, saliency

TOOLS = {'evaluate': evaluate, 'inference': inference, 'saliency': saliency}
REPO = pathlib.Path(__file__).resolve().parents[1]


def _commands_in_readme() -> list[list[str]]:
  """Each of our programs the README runs (launch.py, python -m ..., benchmarks/*.py), once, as argv."""
  found = re.findall(r'python (launch\.py|-m (?:melanoma_jax|benchmarks)\.\w+|benchmarks/\w+\.py)',
                     (REPO / 'README.md').read_text())
  return [program.split() for program in dict.fromkeys(found)]


@pytest.mark.parametrize('name', sorted(TOOLS))
@pytest.mark.parametrize('help_flag', ['--help', '--helpfull'])
def test_tool_help_lists_every_flag_and_exits_0(name, help_flag, capsys):
  module = TOOLS[name]
  with pytest.raises(SystemExit) as exit_info:
    module.main([help_flag])
  assert exit_info.value.code == 0
  out = capsys.readouterr().out
  assert out.startswith(module.__doc__)
  for flag in module.FLAGS:
    assert f'--{flag}:' in out or f'--[no]{flag}:' in out
    assert module.FLAGS[flag].help.split()[0] in out
  assert ('--flagfile' in out) == (help_flag == '--helpfull')


def test_every_readme_command_has_help_and_one_line_errors():
  """The tools (tested here, in this process) load slowly; the others run as the README runs them."""
  commands = _commands_in_readme()
  assert {'launch.py', 'benchmarks/train_throughput.py'} <= {c[0] for c in commands}
  assert {name for _, name in filter(lambda c: c[0] == '-m', commands)} >= {f'melanoma_jax.{t}' for t in TOOLS}
  commands = [c for c in commands if c[-1].removeprefix('melanoma_jax.') not in TOOLS]
  errors = {
      '--nosuch=1': "Unknown command line flag 'nosuch'",
      '--config.model.nmae=seed_cnn': ("--config.model.nmae: the config has no field 'nmae' "
                                       '(Did you mean "name" instead of "nmae"?)'),
      '--config.nosuch=1': "--config.nosuch: the config has no field 'nosuch'",
      '--mode=train': '--workdir is required to train.',
  }
  runs = [[*command, '--help'] for command in commands] + [
      ['launch.py', '--config=configs/balanced.py', error] for error in errors]
  procs = [subprocess.Popen([sys.executable, *argv], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True) for argv in runs]
  for argv, proc in zip(runs, procs):
    out, err = proc.communicate(timeout=240)
    if argv[-1] == '--help':
      assert proc.returncode == 0, (argv, err[-2000:])
      assert '\nflags:\n' in out and re.search(r'^  --', out, re.M), (argv, out[-2000:])
    else:
      assert proc.returncode == 1
      assert err.strip().splitlines()[-1] == f'Error: {errors[argv[-1]]} (--help lists the flags)'
      assert 'Traceback' not in err


@pytest.mark.parametrize('args', [['--help'], ['--config=configs/balanced.py', '--nosuch=1'],
                                  ['--config=configs/balanced.py', '--workdir=']])
def test_launcher_answers_help_and_command_line_errors_before_loading_tensorflow_or_jax(args):
  result = subprocess.run([sys.executable, '-X', 'importtime', 'launch.py', *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120, check=False)
  assert result.returncode == (0 if args == ['--help'] else 1), result.stderr[-2000:]
  imported = {line.rsplit('|', 1)[1].strip() for line in result.stderr.splitlines()
              if line.startswith('import time:')}
  assert 'absl.flags' in imported
  assert not {'tensorflow', 'jax', 'flax'} & imported


@pytest.mark.parametrize('argv,message', [
    (['--workdir=r', '--tta', '--nosuch=1'], "Unknown command line flag 'nosuch'"),
    (['--split=val'], 'Flag --workdir must have a value'),
    (['--workdir=r', '--split=validation'], 'flag --split=validation'),
    (['--workdir=r', '--target_sensitivity=nan'], '--target_sensitivity must be a number in [0, 1]'),
    (['--workdir=r', '--step=-1'], 'flag --step=-1'),
    (['--workdir', 'runs/a', 'runs/b'], "Unexpected arguments ['runs/b']: .* (--workdir=A --workdir=B)"),
])
def test_a_bad_command_line_is_one_error_line(argv, message):
  with pytest.raises(SystemExit) as exit_info:
    evaluate.main(argv)
  text = str(exit_info.value.code)
  assert text.startswith('Error: ') and text.endswith('(--help lists the flags)') and '\n' not in text
  assert re.search(re.escape(message).replace(r'\.\*', '.*'), text)


def test_flags_parse_afresh_each_call_repeat_and_become_absolute(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert cli.parse(inference.FLAGS, ['--workdir=a', '--workdir', '~/b', '--tta', '--output=p.csv',
                                     '--', 'x.png', '--json'], '', positional='PATH') == ['x.png', '--json']
  assert inference.FLAGS.workdir == [str(tmp_path / 'a'), os.path.expanduser('~/b')]
  assert inference.FLAGS.tta and not inference.FLAGS.json
  assert inference.FLAGS.output == str(tmp_path / 'p.csv')
  cli.parse(inference.FLAGS, ['x.png', '--workdir=c', '--output=q.csv'], '', positional='PATH')
  assert inference.FLAGS.workdir == [str(tmp_path / 'c')] and not inference.FLAGS.tta
  with pytest.raises(SystemExit, match='Give at least one PATH'):
    cli.parse(inference.FLAGS, ['--workdir=c', '--output=q.csv'], '', positional='PATH')


def test_inference_refuses_a_training_run_given_as_images(tmp_path):
  (tmp_path / 'run' / 'checkpoints').mkdir(parents=True)
  (tmp_path / 'run' / 'config.json').write_text('{}')
  with pytest.raises(SystemExit, match=r"are training runs, not images: give several runs as "
                     r"--workdir=A --workdir=B"):
    inference.main([f'--workdir={tmp_path / "other"}', str(tmp_path / 'run'), f'--output={tmp_path}/p.csv'])
