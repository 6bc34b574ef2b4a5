"""Every command the README shows, run as a new user types it, from a fresh directory.

Each `python launch.py ...` and `python -m melanoma_jax....` command of
README.md's shell blocks (```bash and plain ```) runs in a temporary current directory holding only
what a clone has there (launch.py and configs/, linked), with relative
paths exactly as written. Allowed changes: size overrides appended to
training commands (a tiny dataset, one epoch, 32 px, unless the command sets
its own), optional `[...]` parts
included with their placeholders filled in, and input files made under the
names the README uses (PATH, ROOT, DOWNLOADS, lesions/, extra.jpg, lesion.jpg). The
environment is a user's: no XLA flags, TensorFlow log level or glibc
tunables of the test process (only its XLA compilation cache, which reuses
programs compiled for identical inputs and changes no result). Each command must exit 0, leave the outputs the
README says it leaves, and print none of TensorFlow's start-up banners.
"""

import dataclasses
import os
import pathlib
import re
import shlex
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from melanoma_jax import runtime
from melanoma_jax.datasets import ISIC_CLASSES, isic_skin_cancer
import field_fixtures
from test_real_builders import _tree

REPO = pathlib.Path(__file__).resolve().parents[1]
README = REPO / 'README.md'
TIMEOUT = 300  # seconds per command; a hang fails the test
# Appended to training commands (never to --mode=prepare): a tiny run.
SIZE_OVERRIDES = ('--config.num_epochs=1', '--config.image_size=32', '--config.batch_size=8')
TINY_SYNTHETIC = '--config.dataset=synthetic_lesions/tiny'
# Recipes whose learning-rate warmup needs their own epoch count (3 with :synthetic).
KEEP_EPOCHS = ('configs/finetune.py',)
FOLDER_CLASSES = ('melanoma', 'nevus', 'seborrheic keratosis')
# The inputs the README's prediction commands name (made by `sandbox`) and the images each holds.
INPUT_IMAGES = {'lesions/': ['lesions/a.jpg', 'lesions/more/b.PNG'], 'extra.jpg': ['extra.jpg']}
SKIPPED = {  # What a command needs that a test machine lacks.
    'gs://': 'needs a Cloud TPU VM slice and a gs:// bucket',
    '--distributed': 'needs a cluster (Cloud TPU VM or SLURM) for the other processes to be found',
    '--coordinator_address=10.0.0.1': 'needs a second host; tests/test_multihost.py runs launch.py '
                                       'with these flags on loopback',
}


def _shell_blocks(text: str) -> list[str]:
  """The contents of the fenced blocks marked bash, sh or nothing."""
  blocks, current, shell = [], None, False
  for line in text.splitlines():
    if not line.startswith('```'):
      if current is not None:
        current.append(line)
    elif current is None:
      current, shell = [], line[3:].strip() in ('', 'bash', 'sh', 'shell')
    else:
      if shell:
        blocks.append('\n'.join(current))
      current = None
  return blocks


def readme_commands() -> list[str]:
  """The launch.py and melanoma_jax commands of the README's shell blocks, in order, lines joined."""
  commands = []
  for block in _shell_blocks(README.read_text()):
    for line in re.sub(r'\\\n\s*', ' ', block).splitlines():
      commands += [m.group(0).strip() for m in re.finditer(
          r'python (?:launch\.py|-m melanoma_jax\.\w+)\b[^&"#\n]*', line)]
  return commands


def workdir_outputs() -> list[str]:
  """The files and folders of the README's table of what a run leaves in its workdir."""
  table = README.read_text().split('## What a run leaves in its workdir')[1].split('\n\n')[1]
  return [name for row in table.splitlines()[2:] for name in re.findall(r'`([^`]+)`', row.split('|')[1])]


def _flag(tokens: list[str], name: str) -> str | None:
  """The value of --name=VALUE or --name VALUE (the first, for a flag given several)."""
  for i, token in enumerate(tokens):
    if token.startswith(f'--{name}='):
      return token.split('=', 1)[1]
    if token == f'--{name}' and i + 1 < len(tokens):
      return tokens[i + 1]
  return None


@pytest.fixture(scope='module')
def sandbox(tmp_path_factory) -> pathlib.Path:
  """A new user's current directory, with the README's input files made under the README's names."""
  cwd = tmp_path_factory.mktemp('user')
  for name in ('launch.py', 'configs'):
    (cwd / name).symlink_to(REPO / name)
  _tree(cwd / 'PATH' / isic_skin_cancer.ARCHIVE_NAME, {'Train': 2, 'Test': 1}, ISIC_CLASSES)
  _tree(cwd / 'ROOT', {'Train': 3, 'Test': 1}, FOLDER_CLASSES)
  rng = np.random.default_rng(0)
  image = lambda path, shape: Image.fromarray(rng.integers(0, 256, shape, np.uint8)).save(path)
  (cwd / 'lesions' / 'more').mkdir(parents=True)
  image(cwd / 'lesions' / 'a.jpg', (50, 60, 3))
  image(cwd / 'lesions' / 'more' / 'b.PNG', (300, 280, 3))
  image(cwd / 'extra.jpg', (40, 40, 3))
  image(cwd / 'lesion.jpg', (90, 70, 3))
  (cwd / 'lesions' / 'metadata.csv').write_text('image,age,sex,site\na,45,female,torso\n')
  field_fixtures.write_downloads(cwd / 'DOWNLOADS')
  return cwd


@dataclasses.dataclass
class User:
  """A new user's shell: current directory, home (and TFDS data) folder, environment."""
  cwd: pathlib.Path
  home: pathlib.Path
  env: dict[str, str]
  done: dict[tuple[str, pathlib.Path], tuple[list[str], str]] = dataclasses.field(default_factory=dict)

  def run(self, command: str, cwd: pathlib.Path | None = None) -> tuple[list[str], str]:
    """Runs a README command (once) as the README says; returns (the tokens run, the output)."""
    cwd = cwd or self.cwd
    if (command, cwd) in self.done:
      return self.done[command, cwd]
    tokens = shlex.split(command)
    module = tokens[2] if tokens[1] == '-m' else None
    if module is not None and (workdir := _flag(tokens, 'workdir')):
      # The README command that trains this run comes first.
      self.run(next(c for c in readme_commands() if c.startswith('python launch.py')
                    and _flag(shlex.split(c), 'workdir') == workdir))
      if any(t.endswith('=N]') for t in tokens):
        steps = sorted(int(p.name) for p in (cwd / workdir / 'checkpoints').iterdir() if p.name.isdigit())
        tokens = [t.replace('=N]', f'={steps[-1]}]') for t in tokens]
    tokens = [t.strip('[]') for t in tokens]  # Optional parts included.
    if module is None and _flag(tokens, 'mode') != 'prepare':
      synthetic = _flag(tokens, 'config').endswith(':synthetic')
      tokens += [flag for flag in (*SIZE_OVERRIDES, *([TINY_SYNTHETIC] if synthetic else []))
                 if not _flag(tokens, flag[2:].split('=')[0])  # the command's own size stays
                 and not (flag.startswith('--config.num_epochs=') and _flag(tokens, 'config').startswith(
                     KEEP_EPOCHS))]
    proc = subprocess.run([sys.executable, *tokens[1:]], cwd=cwd, env=self.env, capture_output=True,
                          text=True, timeout=TIMEOUT, check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f'{shlex.join(tokens)}\n{output[-4000:]}'
    self.done[command, cwd] = tokens, output
    return tokens, output


@pytest.fixture(scope='module')
def user(sandbox, tmp_path_factory) -> User:
  home = tmp_path_factory.mktemp('home')
  env = {k: v for k, v in os.environ.items()
         if k not in ('XLA_FLAGS', 'TF_CPP_MIN_LOG_LEVEL', 'GLIBC_TUNABLES')}
  env.update(HOME=str(home), TFDS_DATA_DIR=str(home / 'tensorflow_datasets'),
             PYTHONPATH=os.pathsep.join([str(REPO), *filter(None, [env.get('PYTHONPATH')])]))
  return User(sandbox, home, env)


def _check_outputs(tokens: list[str], output: str, user: User) -> None:
  """What the README says the command leaves."""
  cwd = user.cwd
  module = tokens[2] if tokens[1] == '-m' else None
  workdir = cwd / _flag(tokens, 'workdir') if _flag(tokens, 'workdir') else None
  if module is None and _flag(tokens, 'mode') == 'prepare':
    prepared = user.home / 'tensorflow_datasets' / 'isic_skin_cancer' / '256px' / '1.0.0'
    assert (prepared / 'preparation_report.json').exists(), output[-2000:]
  elif module is None and '--all_folds' in tokens:
    for name in ('oof_predictions.csv', 'cv_report.md', 'cv_report.json', 'report.md', 'predictions.csv',
                 'operating_point.json', 'ensemble.json'):
      assert (workdir / name).exists(), f'{name} missing from {workdir}'
    for fold in range(int(_flag(tokens, 'config.num_folds'))):
      for name in workdir_outputs():
        assert (workdir / f'fold_{fold}' / name).exists(), f'{name} missing from {workdir}/fold_{fold}'
    assert f'CV report: {workdir / "cv_report.md"}' in output
  elif module is None:
    # A cross-validation run is one ordinary run per fold.
    runs = sorted(workdir.glob('fold_*')) or [workdir]
    for run in runs:
      for name in workdir_outputs():
        assert (run / name).exists(), f'{name} missing from {run}'
    assert re.search(r'Test: test_loss=\S+ test_accuracy=', output)
    assert any(f'Report: {run / "report.md"}' in output for run in runs)  # Absolute: where it went.
  elif module == 'melanoma_jax.evaluate':
    out = (cwd / _flag(tokens, 'output_dir') if _flag(tokens, 'output_dir') else workdir / 'evaluation' /
           (f'{_flag(tokens, "split")}-step{_flag(tokens, "step")}' + ('-tta' if '--tta' in tokens else '')))
    for name in ('report.md', 'report.json', 'predictions.csv', 'confusion_matrix.png', 'roc_curves.png',
                 'reliability.png'):
      assert (out / name).exists(), f'{name} missing from {out}'
  elif module == 'melanoma_jax.inference':
    csv = cwd / _flag(tokens, 'output')
    header, *rows = [row.split(',') for row in csv.read_text().splitlines()]
    assert header[:4] == ['file', 'predicted_class', 'melanoma_probability', 'melanoma_alert']
    assert sorted(row[0] for row in rows) == sorted(sum((INPUT_IMAGES.get(t, []) for t in tokens), []))
    assert all(row[header.index('error')] == '' for row in rows)
    if '--json' in tokens:
      assert csv.with_suffix('.json').exists()
  elif module == 'melanoma_jax.saliency':
    assert (cwd / _flag(tokens, 'output')).stat().st_size > 10_000
  else:
    pytest.fail(f'No expected outputs known for {module}; add them to this test.')


@pytest.mark.parametrize('command', readme_commands())
def test_readme_command_works_as_written(command, user):
  for marker, reason in SKIPPED.items():
    if marker in command:
      pytest.skip(reason)
  tokens, output = user.run(command)
  _check_outputs(tokens, output, user)
  for banner in runtime.START_UP_BANNERS:
    assert banner not in output


def test_the_readme_commands_are_found():
  commands = readme_commands()
  assert commands[0] == 'python launch.py --config=configs/balanced.py:synthetic --workdir=runs/balanced_synthetic'
  for module in ('evaluate', 'inference', 'saliency'):
    assert any(c.startswith(f'python -m melanoma_jax.{module} ') for c in commands)
  assert sum('--mode=prepare' in c for c in commands) == 1


def test_rerun_from_another_directory_with_the_absolute_path_resumes(user, tmp_path):
  first = readme_commands()[0]
  user.run(first)
  history = (user.cwd / 'runs' / 'balanced_synthetic' / 'history.jsonl').read_text()
  absolute = re.sub(r'(launch\.py|--config=|--workdir=)(\S*)',
                    lambda m: f'{user.cwd}/{m[1]}' if m[1] == 'launch.py' else f'{m[1]}{user.cwd}/{m[2]}', first)
  _, output = user.run(absolute, cwd=tmp_path)
  assert 'Resumed from step' in output
  assert (user.cwd / 'runs' / 'balanced_synthetic' / 'history.jsonl').read_text() == history
