"""`python -m mocojax.sweep`: a 2-run grid of tiny runs, killed in its second run and rerun,
continues there and leaves the first alone; the grid, names and outcomes without training."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from mocojax import metrics_log, sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The tiny test model on 64 generated images: startup dominates each run, and the kNN bank
# is 64 images, not Fashion-MNIST's 60,000 (seconds per run).
CONFIG = '''
from configs import demo

def get_config():
  c = demo.get_config()
  c.model.width, c.model.depth, c.model.num_heads = 32, 2, 2
  c.head.hidden_dim, c.head.out_dim = 64, 32
  c.batch_size, c.eval.batch_size = 32, 64
  c.data.source, c.data.data_dir = 'folder', {data_dir!r}
  c.data.train_split, c.data.eval_split = 'train', 'test'
  c.data.mean, c.data.std = (0.5,) * 3, (0.25,) * 3
  c.total_steps, c.warmup_epochs = 6, 0.0
  c.eval.knn_every_epochs, c.eval.knn_ks = 1, (5,)
  c.log_every_steps, c.checkpoint_every_steps = 1, 2
  c.online_probe.enabled, c.plot = False, False
  return c
'''


def _images(root):
  """Two classes of 28x28 RGB images, dark and bright, with noise: 32 train, 8 test each."""
  rng = np.random.default_rng(0)
  for split, n in (('train', 32), ('test', 8)):
    for label, level in (('dark', 60), ('bright', 190)):
      os.makedirs(root / split / label)
      for i in range(n):
        pixels = np.clip(level + 40 * rng.standard_normal((28, 28, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / split / label / f'{i}.png')


def _sweep_cmd(tmp_path):
  (tmp_path / 'tiny_config.py').write_text(CONFIG.format(data_dir=str(tmp_path / 'images')))
  return [sys.executable, '-m', 'mocojax.sweep', f'--config={tmp_path / "tiny_config.py"}',
          f'--workdir={tmp_path / "sweep"}', '--grid=optimizer.base_lr=1e-3,4e-3',
          '--config.seed=3']


def test_killed_sweep_continues_where_it_stopped(tmp_path):
  _images(tmp_path / 'images')
  cmd = _sweep_cmd(tmp_path)
  first, second = (tmp_path / 'sweep' / f'optimizer.base_lr={lr}' for lr in ('0.001', '0.004'))
  proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)
  # Stop the sweep once the second run has saved a checkpoint (it runs 6 steps, saving every 2).
  deadline = time.time() + 240
  while not (second / 'checkpoints').is_dir() or not any((second / 'checkpoints').iterdir()):
    assert proc.poll() is None, proc.stdout.read()
    assert time.time() < deadline, 'the second run never saved'
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  out = proc.communicate(timeout=120)[0]
  assert proc.returncode == 128 + signal.SIGTERM, out
  assert sweep.read_marker(str(first))['status'] == 'done'
  assert sweep.read_marker(str(second)) is None, out  # stopped before its end
  assert 'rerun the same command to continue' in out
  first_files = {p: p.stat().st_mtime_ns for p in first.rglob('*') if p.is_file()}

  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240)
  assert out.returncode == 0, out.stdout + out.stderr
  assert 'optimizer.base_lr=0.001: done before, skipped' in out.stdout
  assert first_files == {p: p.stat().st_mtime_ns for p in first.rglob('*') if p.is_file()}
  assert sweep.read_marker(str(second))['status'] == 'done'
  assert 'Resumed from' in (second / 'train.log').read_text()
  # Each step once in the resumed run's log.
  rows = metrics_log.read_rows(str(second / 'metrics.jsonl'))
  assert [r['step'] for r in rows if 'loss' in r] == list(range(1, 7))

  table = (tmp_path / 'sweep' / 'sweep.md').read_text()
  for run in (first, second):
    row = next(line for line in table.splitlines() if line.startswith(f'| {run.name} |'))
    cells = [c.strip() for c in row.strip('|').split('|')]
    assert cells[-1] == 'done', row
    assert 0 <= float(cells[1]) <= 100 and float(cells[1]) <= float(cells[2]), row
  assert 'kNN top-1@5' in table
  assert (tmp_path / 'sweep' / 'sweep.png').stat().st_size > 10_000
  assert '| optimizer.base_lr=0.004 |' in out.stdout  # the table, printed


def test_grid_names_and_arguments():
  runs = sweep.plan(sweep.parse_grid(['optimizer.base_lr=1e-4,5e-4',
                                      'model.stop_grad_patch_embed=True,false']))
  assert [r.name for r in runs] == [
      'optimizer.base_lr=0.0001,model.stop_grad_patch_embed=True',
      'optimizer.base_lr=0.0001,model.stop_grad_patch_embed=False',
      'optimizer.base_lr=0.0005,model.stop_grad_patch_embed=True',
      'optimizer.base_lr=0.0005,model.stop_grad_patch_embed=False']
  assert runs[1].args('configs/demo.py', ['--config.seed=1']) == [
      '--config=configs/demo.py', '--config.seed=1', '--config.optimizer.base_lr=1e-4',
      '--config.model.stop_grad_patch_embed=false']
  assert [sweep.parse_value(v) for v in ('3', '2e-3', 'True', 'None', 'adamw')] == [
      3, 0.002, True, None, 'adamw']
  assert [r.name for r in sweep.plan([])] == ['base']
  with pytest.raises(ValueError, match='same run'):
    sweep.plan(sweep.parse_grid(['optimizer.base_lr=1e-3,0.001']))
  with pytest.raises(ValueError, match='key=value1'):
    sweep.parse_grid(['optimizer.base_lr'])
  assert sweep.check_keys('configs/demo.py', ['optimizer.base_lr', 'optimizer.lrr']) == [
      "config.optimizer.lrr is not a setting (config.optimizer has no 'lrr'); did you mean "
      'config.optimizer.base_lr?']


def test_outcomes():
  assert sweep.classify(0, '', stopped=False) == {'status': 'done'}
  log = 'I1130 ...\nStep 412 diverged: the loss is nan. Nothing from it was saved.\n'
  assert sweep.classify(1, log, stopped=False) == dict(
      status='diverged', step=412,
      message='Step 412 diverged: the loss is nan. Nothing from it was saved.')
  assert sweep.classify(143, 'saving', stopped=True) == {'status': 'stopped'}
  assert sweep.classify(1, 'Traceback ...\nValueError: boom\n', stopped=False) == dict(
      status='failed', returncode=1, message='ValueError: boom')
