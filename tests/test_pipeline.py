"""Pipeline determinism, host slicing, eval coverage and device feeding."""

import dataclasses
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf

from mocojax.data import pipeline
from mocojax.data.sources import Source

MEAN, STD = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]
SIZE = 8
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _indexed_source(n=40, hw=10):
  """Labels equal example indices, so batches reveal which rows they hold."""
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (n, hw, hw, 3), dtype=np.uint8)
  return Source.from_arrays(images, np.arange(n), num_classes=n)


def _train(source, **kw):
  args = dict(global_batch=8, seed=3, start_step=0, image_size=SIZE,
              process_index=0, process_count=1)
  args.update(kw)
  return pipeline.train_dataset(source, **args)


def _take(ds, n):
  return [b for b, _ in zip(ds.as_numpy_iterator(), range(n))]


def test_shapes_and_dtypes():
  (batch,) = _take(_train(_indexed_source()), 1)
  assert batch['view1'].shape == (8, SIZE, SIZE, 3)
  assert batch['view2'].shape == (8, SIZE, SIZE, 3)
  assert batch['view1'].dtype == np.uint8  # the device finishes the views
  assert batch['label'].shape == (8,) and batch['label'].dtype == np.int32
  assert not np.array_equal(batch['view1'], batch['view2'])
  # Each example carries its global step and row, which key its device-side draws.
  np.testing.assert_array_equal(batch['step'], np.zeros(8))
  np.testing.assert_array_equal(batch['row'], np.arange(8))
  (later,) = _take(_train(_indexed_source(), start_step=6), 1)
  np.testing.assert_array_equal(later['step'], np.full(8, 6))


def test_epochs_are_permutations_and_roll_over():
  source = _indexed_source(n=43)  # 3 left over: dropped each epoch
  spe = pipeline.steps_per_epoch(source, 8)
  assert spe == 5
  labels = [b['label'] for b in _take(_train(source), 2 * spe)]
  epoch0 = np.concatenate(labels[:spe])
  epoch1 = np.concatenate(labels[spe:])
  assert len(set(epoch0)) == 40 and len(set(epoch1)) == 40
  assert not np.array_equal(epoch0, epoch1)


def test_resume_is_bit_identical():
  source = _indexed_source()
  full = _take(_train(source), 8)  # crosses the epoch boundary at step 5
  resumed = _take(_train(source, start_step=3), 5)
  for a, b in zip(full[3:], resumed):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])


def test_hosts_get_disjoint_slices_of_the_same_global_batch():
  source = _indexed_source()
  whole = _take(_train(source), 6)
  host0 = _take(_train(source, process_index=0, process_count=2), 6)
  host1 = _take(_train(source, process_index=1, process_count=2), 6)
  for w, h0, h1 in zip(whole, host0, host1):
    assert h0['label'].shape == (4,)
    assert not set(h0['label']) & set(h1['label'])
    np.testing.assert_array_equal(
        w['label'], np.concatenate([h0['label'], h1['label']]))
    # Same examples, random draws and keys of the device-side draws. The
    # crops agree to one grey level: vectorised kernels round differently at
    # different batch sizes, which may tip a rounding to uint8.
    for key in ('row', 'step'):
      np.testing.assert_array_equal(w[key], np.concatenate([h0[key], h1[key]]))
    for key in ('view1', 'view2'):
      both = np.concatenate([h0[key], h1[key]]).astype(int)
      assert np.abs(w[key].astype(int) - both).max() <= 1


def test_per_example_path_matches_per_step_path():
  """Sources without batched lookup (image files) crop per example with PIL;
  in-memory ones crop a whole step with matmuls. Same uniforms, same
  windows, same filter, so the crops agree to one grey level (PIL rounds
  to uint8 between its two passes, the matmuls once), most exactly."""
  source = _indexed_source()
  per_example = dataclasses.replace(source, batched_lookup=False)
  for a, b in zip(_take(_train(source), 3), _take(_train(per_example), 3)):
    for key in ('label', 'step', 'row'):
      np.testing.assert_array_equal(a[key], b[key])
    for key in ('view1', 'view2'):
      diff = np.abs(a[key].astype(int) - b[key].astype(int))
      assert diff.max() <= 1 and (diff == 0).mean() > 0.8


def test_seed_changes_order_and_augmentation():
  source = _indexed_source()
  (a,) = _take(_train(source, seed=1), 1)
  (b,) = _take(_train(source, seed=2), 1)
  assert not np.array_equal(a['label'], b['label'])
  assert not np.array_equal(a['view1'], b['view1'])


def test_bad_batch_split_is_rejected():
  with pytest.raises(ValueError, match='not divisible by process_count'):
    _train(_indexed_source(), global_batch=9, process_count=2)
  with pytest.raises(ValueError, match='exceeds'):
    _train(_indexed_source(n=4))


@pytest.mark.parametrize('batched_lookup', [True, False])
def test_eval_counts_each_example_once_across_hosts(batched_lookup):
  n, global_batch = 1000, 96
  source = dataclasses.replace(_indexed_source(n=n, hw=SIZE),
                               batched_lookup=batched_lookup)
  seen, steps = [], []
  for pi in range(2):
    batches = list(pipeline.eval_dataset(
        source, global_batch=global_batch, image_size=SIZE,
        process_index=pi, process_count=2).as_numpy_iterator())
    steps.append(len(batches))
    for b in batches:
      assert b['image'].shape == (48, SIZE, SIZE, 3)
      seen.extend(b['label'][b['mask']])
  assert steps == [11, 11]  # ceil(1000 / 96), same on every host
  assert sorted(seen) == list(range(n))


def test_eval_passes_through_native_size_and_crops_larger():
  source = _indexed_source(n=4, hw=SIZE)
  (batch,) = pipeline.eval_dataset(
      source, global_batch=4, image_size=SIZE, process_index=0,
      process_count=1).as_numpy_iterator()
  expected = source.lookup(tf.range(4))['image'].numpy()
  assert batch['image'].dtype == np.uint8
  np.testing.assert_array_equal(batch['image'], expected)

  # Larger images: resize the short side to round(8 * 256 / 224) = 9, then
  # centre-crop 8, identically per example and per batch.
  big = _indexed_source(n=4, hw=20)
  outputs = []
  for batched in (True, False):
    (batch,) = pipeline.eval_dataset(
        dataclasses.replace(big, batched_lookup=batched), global_batch=4,
        image_size=SIZE, process_index=0, process_count=1).as_numpy_iterator()
    outputs.append(batch['image'])
  assert outputs[0].shape == (4, SIZE, SIZE, 3)
  np.testing.assert_array_equal(outputs[0], outputs[1])
  # torchvision Resize(9) + CenterCrop(8) on PIL images, as the reference.
  from PIL import Image
  for image, got in zip(big.lookup(tf.range(4))['image'].numpy(), outputs[0]):
    resized = np.asarray(Image.fromarray(image).resize((9, 9), Image.BILINEAR))
    np.testing.assert_array_equal(got, resized[0:8, 0:8])


def test_eval_batches_normalise_on_the_device():
  from mocojax import parallel
  source = _indexed_source(n=8, hw=SIZE)
  sharding = parallel.batch_sharding(parallel.make_mesh())
  (batch,) = list(pipeline.eval_batches(
      source, sharding=sharding, global_batch=8, image_size=SIZE, mean=MEAN,
      std=STD))
  assert batch['image'].dtype == np.float32
  expected = (source.lookup(tf.range(8))['image'].numpy() / 255.0 - 0.5) / 0.25
  np.testing.assert_allclose(np.asarray(batch['image']), expected, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(batch['mask']), True)


_DEVICE_SCRIPT = textwrap.dedent("""
    import jax, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from mocojax.data import pipeline
    from mocojax.data.sources import Source

    assert jax.device_count() == 8, jax.devices()
    rng = np.random.default_rng(0)
    source = Source.from_arrays(
        rng.integers(0, 256, (64, 8, 8, 1), dtype=np.uint8), np.arange(64),
        num_classes=64)
    ds = pipeline.train_dataset(
        source, global_batch=16, seed=0, start_step=0, image_size=8,
        process_index=0, process_count=1)
    sharding = NamedSharding(Mesh(np.array(jax.devices()), ('data',)),
                             P('data'))
    expected = [b for b, _ in zip(ds.as_numpy_iterator(), range(5))]
    got = [b for b, _ in zip(pipeline.device_batches(ds, sharding), range(5))]
    assert len(got) == 5
    for e, g in zip(expected, got):
      for key in e:
        assert isinstance(g[key], jax.Array)
        assert g[key].shape == e[key].shape
        assert g[key].sharding == sharding
        assert len(g[key].addressable_shards) == 8
        assert g[key].addressable_shards[0].data.shape[0] == 2
        np.testing.assert_array_equal(np.asarray(g[key]), e[key])
    # Finite datasets are drained completely, prefetch queue included.
    assert len(list(pipeline.device_batches(ds.take(3), sharding))) == 3

    # The device half runs on each device's rows and gives what one device gives, in both
    # schedules (image by image on CPUs, vmapped elsewhere).
    import functools
    from mocojax.data import photometric, recipes
    got = [b for b, _ in zip(pipeline.train_batches(
        source, sharding=sharding, global_batch=16, seed=0, start_step=0, image_size=8,
        mean=[0.5], std=[0.25], process_index=0, process_count=1), range(2))]
    for per_image in (True, False):
      finish = jax.jit(functools.partial(
          photometric.two_views, specs=recipes.view_specs('mocov3'), seed=0, mean=(0.5,),
          std=(0.25,), per_image=per_image))
      for e, g in zip(expected, got):
        want = finish(jax.device_put(e, jax.devices()[0]))
        assert set(g) == {'view1', 'view2', 'label'}
        for key in want:
          assert g[key].sharding == sharding
          np.testing.assert_allclose(np.asarray(g[key]), np.asarray(want[key]), atol=1e-5)
    print('OK')
""")


def test_device_batches_shards_over_8_cpu_devices():
  import jax
  if jax.device_count() >= 8 and jax.default_backend() == 'cpu':
    exec(compile(_DEVICE_SCRIPT, 'device_script', 'exec'), {})
    return
  # The device count is fixed when JAX starts, so without the flag set for
  # the whole test session the check runs in a fresh interpreter.
  env = dict(os.environ, XLA_FLAGS=os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8',
             JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='3')
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env['PYTHONPATH'] = os.pathsep.join(
      [root] + [p for p in [env.get('PYTHONPATH')] if p])
  result = subprocess.run([sys.executable, '-c', _DEVICE_SCRIPT], env=env,
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 0 and 'OK' in result.stdout, result.stderr[-3000:]


_OPEN_AT_EXIT = '''
import sys
import ml_collections
from mocojax import parallel
from mocojax.data import pipeline, sources
config = ml_collections.ConfigDict(dict(source='folder', data_dir=sys.argv[1], name='f',
                                        train_split='train', eval_split='train', channels=3))
batches = pipeline.train_batches(
    sources.get_source(config, 'train'), global_batch=8, seed=0, start_step=0, image_size=224,
    mean=(0.5,) * 3, std=(0.2,) * 3,
    sharding=parallel.batch_sharding(parallel.make_mesh()))
next(batches)
if sys.argv[2] == 'crash':
  raise RuntimeError('a crash with the pipeline open')
'''


@pytest.mark.parametrize('how', ['crash', 'module_level'])
def test_process_with_an_open_image_pipeline_exits(tmp_path, how):
  """tf.data threads call back into Python (the PIL crops); an open pipeline at interpreter
  exit must not hang the process (they are closed at exit)."""
  rng = np.random.default_rng(0)
  for k in range(16):  # large enough that crops are still in flight when the script ends
    path = tmp_path / 'train' / f'c{k % 2}' / f'{k}.jpg'
    path.parent.mkdir(parents=True, exist_ok=True)
    tf.io.write_file(str(path), tf.io.encode_jpeg(rng.integers(0, 256, (600, 500, 3), np.uint8)))
  script = tmp_path / 'open_at_exit.py'
  script.write_text(_OPEN_AT_EXIT)
  log = tmp_path / 'log.txt'
  with open(log, 'w') as out:
    result = subprocess.run([sys.executable, str(script), str(tmp_path), how], stdout=out,
                            stderr=subprocess.STDOUT, timeout=90, cwd=ROOT,
                            env=dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu'))
  assert result.returncode == (1 if how == 'crash' else 0), log.read_text()[-2000:]
