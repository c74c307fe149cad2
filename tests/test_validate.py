"""Config validation: every bad setting is one line naming it, all at once, before any work."""

import gzip
import importlib
import os
import pathlib
import subprocess
import sys
import time

import numpy as np
import pytest

from mocojax import validate

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _config(name: str, overrides: dict):
  c = importlib.import_module(f'configs.{name}').get_config()
  for path, value in overrides.items():
    *groups, leaf = path.split('.')
    node = c
    for group in groups:
      node = node[group]
    node[leaf] = value
  return c


# (config module, overrides, the setting the one problem line must name). conftest gives 8
# devices, so batch sizes must be multiples of 8.
BAD = [
    # Numeric ranges.
    ('demo', {'optimizer.base_lr': -1e-3}, 'optimizer.base_lr'),
    ('demo', {'optimizer.base_lr': 0.0}, 'optimizer.base_lr'),
    ('demo', {'optimizer.weight_decay': -0.1}, 'optimizer.weight_decay'),
    ('demo', {'optimizer.b1': 1.0}, 'optimizer.b1'),
    ('demo', {'optimizer.b2': -0.1}, 'optimizer.b2'),
    ('demo', {'optimizer.eps': 0.0}, 'optimizer.eps'),
    ('demo', {'temperature': -0.2}, 'temperature'),
    ('demo', {'temperature': 0.0}, 'temperature'),
    ('demo', {'momentum.base': 1.5}, 'momentum.base'),
    ('demo', {'momentum.base': -0.1}, 'momentum.base'),
    ('demo', {'data.crop_scale': (1.0, 0.2)}, 'data.crop_scale'),
    ('demo', {'data.crop_scale': (0.0, 1.0)}, 'data.crop_scale'),
    ('demo', {'data.crop_scale': (0.2, 1.5)}, 'data.crop_scale'),
    ('demo', {'warmup_epochs': 5.0}, 'warmup_epochs'),
    ('demo', {'warmup_epochs': -1.0}, 'warmup_epochs'),
    ('demo', {'epochs': 0.0}, 'epochs'),
    ('demo', {'total_steps': 0}, 'total_steps'),
    ('demo', {'batch_size': 0}, 'batch_size'),
    ('demo', {'head.out_dim': 0}, 'head.out_dim'),
    ('demo', {'head.hidden_dim': 0}, 'head.hidden_dim'),
    ('demo', {'log_every_steps': 0}, 'log_every_steps'),
    ('demo', {'checkpoint_every_steps': 0}, 'checkpoint_every_steps'),
    ('demo', {'keep_checkpoints': 0}, 'keep_checkpoints'),
    ('demo', {'stop_after_steps': 0}, 'stop_after_steps'),
    ('demo', {'stop_after_steps': -1}, 'stop_after_steps'),
    ('demo', {'eval.batch_size': 0}, 'eval.batch_size'),
    ('demo', {'eval.knn_ks': (0, 20)}, 'eval.knn_ks'),
    ('demo', {'eval.knn_temperature': 0.0}, 'eval.knn_temperature'),
    ('demo', {'eval.knn_every_epochs': -1}, 'eval.knn_every_epochs'),
    ('demo', {'data.image_size': 0}, 'data.image_size'),
    ('demo', {'data.std': (0.0,)}, 'data.std'),
    ('demo', {'data.mean': (0.1, 0.2, 0.3)}, 'data.mean'),
    ('demo', {'data.augment.jitter_p': 1.5}, 'data.augment.jitter_p'),
    ('demo', {'data.augment.grayscale_p': -0.1}, 'data.augment.grayscale_p'),
    ('demo', {'data.augment.blur_sigma': (2.0, 0.1)}, 'data.augment.blur_sigma'),
    ('demo', {'data.augment.crop_ratio': (0.0, 1.0)}, 'data.augment.crop_ratio'),
    ('demo', {'data.augment.jitter': (0.4, 0.4, 0.4)}, 'data.augment.jitter'),
    ('demo', {'online_probe.lr': 0.0}, 'online_probe.lr'),
    ('demo_mocov3_resnet', {'model.width': 0.001}, 'model.width'),
    # Enums.
    ('demo', {'method': 'mocov4'}, 'method'),
    ('demo', {'model.name': 'convnext'}, 'model.name'),
    ('demo', {'optimizer.name': 'adam'}, 'optimizer.name'),
    ('demo', {'optimizer.schedule': 'linear'}, 'optimizer.schedule'),
    ('demo', {'dtype': 'bfloat17'}, 'dtype'),
    ('demo', {'data.recipe': 'simclr'}, 'data.recipe'),
    ('demo', {'data.source': 'arrays'}, 'data.source'),
    ('demo', {'data.eval_split': 'validation'}, 'data.eval_split'),
    ('demo', {'model.variant': 'giant'}, 'model.variant'),
    ('demo', {'model.width': None}, 'model.width'),   # variant 'custom' needs it
    ('demo', {'model.posemb': 'rope'}, 'model.posemb'),
    ('demo', {'model.pool': 'max'}, 'model.pool'),
    ('demo', {'mesh': (('data', -1), ('foo', 1))}, 'mesh'),
    ('demo', {'mesh': (('data', -1), ('fsdp', -1))}, 'mesh'),
    ('demo_mocov3_resnet', {'model.depth': 20}, 'model.depth'),
    ('demo_mocov3_resnet', {'model.bn_stats': 'sync'}, 'model.bn_stats'),
    # Structure.
    ('demo', {'model.num_heads': 3}, 'model.num_heads'),    # width 128
    ('demo', {'model.patch_size': 5}, 'model.patch_size'),  # 28 px
    ('demo', {'data.image_size': 30}, 'data.image_size'),   # patch 7
    ('demo', {'mesh': (('data', 3),)}, 'mesh'),             # 8 devices
    ('demo', {'batch_size': 100}, 'batch_size'),            # 8 devices
    ('demo', {'eval.batch_size': 999}, 'eval.batch_size'),
    ('demo_mocov1', {'queue_size': 1000}, 'queue_size'),    # batch 128
    ('demo_mocov1', {'queue_size': 0}, 'queue_size'),
    ('demo_mocov2', {'symmetric': True, 'queue_size': 33 * 128}, 'queue_size'),
    # (v1/v2's own checks look at the BN groups too: still one line.)
    ('demo_mocov1', {'model.bn_group_size': 48}, 'model.bn_group_size'),
    ('demo_mocov1', {'warmup_epochs': 1.0}, 'warmup_epochs'),  # 'steps' has no warmup
    ('demo_mocov1', {'optimizer.decay_epochs': (3.2, 2.4)}, 'optimizer.decay_epochs'),
    ('demo_mocov1', {'optimizer.decay_epochs': (2.4, 5.0)}, 'optimizer.decay_epochs'),
    # Other methods.
    ('demo_simclr', {'temperature': 0.0}, 'temperature'),
    ('demo_byol', {'momentum.base': 1.5}, 'momentum.base'),
    ('demo_byol', {'method': 'simclr'}, 'temperature'),      # BYOL's config has none
    ('demo_simclr', {'method': 'byol'}, 'momentum'),         # SimCLR's config has none
]


def _id(case):
  name, overrides, _ = case
  return f'{name}:' + ','.join(f'{k}={v}' for k, v in overrides.items())


@pytest.mark.parametrize('case', BAD, ids=[_id(c) for c in BAD])
def test_bad_setting_is_one_line_naming_it(case):
  name, overrides, setting = case
  with pytest.raises(validate.ConfigError) as err:
    validate.check(_config(name, overrides))
  lines = str(err.value).splitlines()
  assert len(lines) == 1, lines
  assert f'config.{setting}' in lines[0]
  assert lines[0].startswith('config.') and lines[0].endswith('.')


def test_all_problems_are_reported_at_once():
  c = _config('demo', {'optimizer.base_lr': -1e-3, 'temperature': 0.0, 'momentum.base': 1.5,
                       'data.crop_scale': (1.0, 0.2), 'dtype': 'bfloat17',
                       'optimizer.schedule': 'linear', 'keep_checkpoints': 0})
  with pytest.raises(validate.ConfigError) as err:
    validate.check(c)
  lines = str(err.value).splitlines()
  settings = ['optimizer.base_lr', 'temperature', 'momentum.base', 'data.crop_scale', 'dtype',
              'optimizer.schedule', 'keep_checkpoints']
  assert len(lines) == len(settings), lines
  for setting in settings:
    assert sum(line.startswith(f'config.{setting}=') for line in lines) == 1, setting


def test_the_method_check_still_raises_a_value_error():
  # methods.check_config (run by build_method) raises the method's own lines, which for v1/v2
  # come from validate.queue_problems.
  from mocojax import methods
  with pytest.raises(ValueError, match=r'queue_size=1000 .*batch_size=128.*queue_size=896'):
    methods.check_config(_config('demo_mocov1', {'queue_size': 1000}))


def _pretraining_configs():
  """Every config module whose get_config() is a pretraining config (it names a method);
  finetune_demo, linear_demo and linear_probe configure other entry points."""
  names = sorted(p.stem for p in (ROOT / 'configs').glob('*.py')
                 if p.stem not in ('__init__', 'common'))
  return [n for n in names if 'method' in importlib.import_module(f'configs.{n}').get_config()]


@pytest.mark.parametrize('name', _pretraining_configs())
def test_every_pretraining_config_passes(name):
  validate.check(_config(name, {}))


def test_every_pretraining_config_is_checked():
  assert {'demo', 'demo_mocov1', 'demo_mocov2', 'demo_mocov3_resnet', 'mocov1_resnet50',
          'mocov2_resnet50', 'mocov3_resnet50', 'mocov3_vit_base', 'mocov3_vit_huge',
          'demo_simclr', 'demo_byol', 'simclr_vit_small', 'simclr_vit_base', 'byol_vit_small',
          'byol_vit_base'} <= set(_pretraining_configs())


def test_check_needs_no_tensorflow_clu_or_data():
  code = ('import sys; from configs import demo; from mocojax import validate; '
          "c = demo.get_config(); c.data.data_dir = '/nonexistent'; validate.check(c); "
          "print(sorted(m for m in ('tensorflow', 'clu') if m in sys.modules))")
  out = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
  assert out.returncode == 0, out.stderr
  assert out.stdout.strip() == '[]'


# ----------------------------------------------------------------------------------------------
# Unknown override keys.
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize('key, suggestion', [
    ('optimizer.lrr', 'config.optimizer.base_lr'),
    ('batch_sizee', 'config.batch_size'),
    ('optimzer.base_lr', 'config.optimizer.base_lr'),
    ('model.num_head', 'config.model.num_heads'),
    ('knn_ks', 'config.eval.knn_ks'),
])
def test_unknown_key_suggests_the_closest_setting(key, suggestion):
  line = validate.unknown_key(_config('demo', {}), key)
  assert f'config.{key}' in line and suggestion in line and '\n' not in line


def test_known_keys_are_not_reported():
  c = _config('demo', {})
  for key in validate.setting_names(c):
    assert validate.unknown_key(c, key) is None, key


def _main(tmp_path, *overrides):
  workdir = tmp_path / 'run'
  start = time.monotonic()
  out = subprocess.run(
      [sys.executable, '-m', 'mocojax.main', '--config=configs/demo.py', f'--workdir={workdir}',
       *overrides], cwd=ROOT, capture_output=True, text=True, timeout=120)
  return out, time.monotonic() - start, workdir


def test_misspelt_override_fails_fast_with_a_did_you_mean(tmp_path):
  out, seconds, workdir = _main(tmp_path, '--config.optimizer.lrr=1', '--config.batch_sizee=8')
  assert out.returncode != 0
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 2, out.stderr
  assert 'config.optimizer.lrr' in lines[0] and 'config.optimizer.base_lr' in lines[0]
  assert 'config.batch_sizee' in lines[1] and 'config.batch_size?' in lines[1]
  assert not workdir.exists()
  assert seconds < 20, seconds   # flag parsing only: no JAX, no TensorFlow


def test_bad_values_on_the_command_line_fail_before_training(tmp_path):
  out, _, workdir = _main(tmp_path, '--config.dtype=bfloat17', '--config.optimizer.base_lr=-1')
  assert out.returncode != 0
  assert 'Traceback' not in out.stderr
  assert "config.dtype='bfloat17'" in out.stderr
  assert 'config.optimizer.base_lr=-1.0' in out.stderr
  assert not workdir.exists()


# ----------------------------------------------------------------------------------------------
# Data files named in their errors.
# ----------------------------------------------------------------------------------------------
def _write_idx(path, array):
  header = bytes([0, 0, 8, array.ndim]) + b''.join(d.to_bytes(4, 'big') for d in array.shape)
  with gzip.open(path, 'wb') as f:
    f.write(header + array.astype(np.uint8).tobytes())


def test_truncated_gzip_names_the_file(tmp_path):
  from mocojax.data import sources
  path = tmp_path / 'train-images-idx3-ubyte.gz'
  _write_idx(path, np.random.default_rng(0).integers(0, 256, (6, 28, 28)))
  path.write_bytes(path.read_bytes()[:-40])   # a cut-short download
  with pytest.raises(ValueError, match='truncated') as err:
    sources.read_idx(path)
  assert str(path) in str(err.value)


def test_labels_of_another_split_name_both_files(tmp_path):
  import ml_collections
  from mocojax.data import sources
  _write_idx(tmp_path / 'train-images-idx3-ubyte.gz', np.zeros((6, 28, 28)))
  _write_idx(tmp_path / 'train-labels-idx1-ubyte.gz', np.array([0, 1, 2, 0]))  # 't10k' labels
  for name in ('t10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz'):
    (tmp_path / name).write_bytes(b'')  # present; only the train split is read
  config = ml_collections.ConfigDict(dict(source='idx', name='x', data_dir=str(tmp_path)))
  with pytest.raises(ValueError) as err:
    sources.get_source(config, 'train')
  message = str(err.value)
  assert os.path.join(tmp_path, 'train-labels-idx1-ubyte.gz') in message
  assert os.path.join(tmp_path, 'train-images-idx3-ubyte.gz') in message
