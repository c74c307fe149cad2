"""The pod planner compiles the real step for virtual devices; the launch scripts dry-run."""

import os
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, 'launch')
SCRIPTS = ('local.sh', 'gpu_single_host.sh', 'tpu_vm.sh', 'slurm_multinode.sbatch')


def test_planner_compiles_vit_small_for_8_virtual_devices():
  # A subprocess: the planner sets its own device count before JAX starts.
  env = {k: v for k, v in os.environ.items() if k not in ('XLA_FLAGS', 'JAX_PLATFORMS')}
  out = subprocess.run(
      [sys.executable, '-m', 'mocojax.plan', '--config=configs/mocov3_vit_small.py',
       '--devices=8', '--batch=16', '--dtype=bfloat16', '--platform-peak-tflops=275',
       '--mfu=0.4'],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  text = out.stdout
  assert '8 devices (mesh data=8)' in text and 'dtype bfloat16' in text
  assert 'indicative, not TPU/GPU memory' in text
  assert 'known bias: ~30% high against one H200' in text   # next to the memory figures
  # ViT-S/16 + heads: ~43M parameters, so base + momentum in f32 are ~0.3 GiB per device.
  params = float(re.search(r'parameters \(base \+ momentum\)\s+([\d.]+) GiB', text).group(1))
  assert 0.25 < params < 0.4, text
  # ViT-S/16 forward: ~9.2 GFLOP per image; a two-view step is ~8 forwards (base forward +
  # backward = 3, momentum forward = 1, per view): 16 images ~ 1.2 TFLOP.
  tflop = float(re.search(r'FLOPs per step: ([\d,.]+) TFLOP', text).group(1).replace(',', ''))
  assert 0.9 < tflop < 1.8, text
  assert re.search(r'all-reduce\s+[1-9]\d*\s', text), text  # the gradients
  assert re.search(r'stated\s+275 TFLOP/s/chip: .* ms/step, .* h for the run', text), text


@pytest.mark.parametrize('script', SCRIPTS)
def test_launch_script_dry_run(script, tmp_path):
  path = os.path.join(LAUNCH, script)
  assert subprocess.run(['bash', '-n', path]).returncode == 0
  args = {'tpu_vm.sh': ['--bucket', 'gs://bucket', 'create', 'setup', 'train', 'logs', 'delete'],
          'local.sh': ['--processes', '2', '--cpu-devices', '4', '--workdir', str(tmp_path / 'w')],
          }.get(script, [])
  env = {k: v for k, v in os.environ.items() if not k.startswith('SLURM_')}
  out = subprocess.run(['bash', path, '--dry-run', *args, '--', '--config.batch_size=64'],
                       env=env, capture_output=True, text=True, timeout=60)
  assert out.returncode == 0, out.stderr
  lines = out.stdout.splitlines()
  assert lines and all(line.startswith('+ ') for line in lines), out.stdout
  assert any('mocojax.main' in line and '--config.batch_size=64' in line for line in lines)
  if script == 'tpu_vm.sh':
    assert sum('--worker=all' in line for line in lines) >= 3
    assert any('tpu-vm create' in line for line in lines)
    assert any('tpu-vm delete' in line for line in lines)
    assert any('gs://bucket/tensorflow_datasets' in line for line in lines)
  if script == 'local.sh':
    assert any('--process_id=1' in line for line in lines)
    assert not os.path.exists(tmp_path / 'w')  # a dry run creates nothing


@pytest.mark.skipif(shutil.which('shellcheck') is None,
                    reason='shellcheck absent: apt-get install -y shellcheck')
def test_launch_scripts_pass_shellcheck():
  out = subprocess.run(['shellcheck', *[os.path.join(LAUNCH, s) for s in SCRIPTS + ('lib.sh',)]],
                       capture_output=True, text=True)
  assert out.returncode == 0, out.stdout


# Runs a script with tensorflow and clu made unimportable, as on a GPU machine that lacks them.
_WITHOUT_TF_AND_CLU = '''
import importlib.abc, runpy, sys
class Blocker(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path=None, target=None):
    if name.split('.')[0] in ('tensorflow', 'clu', 'tensorflow_datasets'):
      raise ImportError(f'{name} is blocked')
sys.meta_path.insert(0, Blocker())
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name='__main__')
'''


def test_step_bench_runs_without_tensorflow_or_clu():
  """The step (step.setup) and its bench import neither: the lent GPU machines have neither."""
  out = subprocess.run(
      [sys.executable, '-c', _WITHOUT_TF_AND_CLU, os.path.join(ROOT, 'bench', 'train_step.py'),
       '--models=demo', '--batch=16', '--steps=1', '--warmup=0'],
      cwd=ROOT, capture_output=True, text=True, timeout=600,
      env=dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=2'))
  assert out.returncode == 0, out.stderr[-3000:]
  assert re.search(r'\| demo \| 16 \| 2 \|', out.stdout), out.stdout[-2000:]
