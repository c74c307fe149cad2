"""The sharded step and the trainer: 1 vs 8 devices, a real 20-step run, resume, bad input."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from mocojax import parallel, train
from mocojax import step as step_lib

FMNIST = '/usr/share/datasets/fashion-mnist'
needs_fmnist = pytest.mark.skipif(
    not os.path.exists(os.path.join(FMNIST, 'train-images-idx3-ubyte.gz')),
    reason='Fashion-MNIST IDX files absent: apt-get install dataset-fashion-mnist')


def _step_on_mesh(config, devices, batch):
  mesh = Mesh(np.array(devices), ('data',))
  setup = step_lib.setup(config, mesh, steps_per_epoch=10, channels=1)
  state = setup.init(jax.random.key(0))
  batch = jax.device_put(batch, setup.batch_sharding)
  metrics = []
  for _ in range(3):
    state, m = setup.step(state, batch)
    metrics.append(jax.device_get(m))
  return state, metrics


def test_eight_devices_equal_one_device(tiny_config):
  if jax.device_count() < 8:
    pytest.skip('needs 8 devices: XLA_FLAGS=--xla_force_host_platform_device_count=8')
  c = tiny_config
  # SGD: parameter updates are linear in the gradients. (AdamW divides by sqrt(v): the qkv key
  # bias has an exactly-zero true gradient, whose rounding noise it would scale up to lr-sized
  # updates that differ between layouts; that says nothing about the sharded step.)
  c.warmup_epochs, c.optimizer.base_lr, c.optimizer.name = 0.0, 1e-1, 'sgd'
  batch = {f'view{v}': np.asarray(jax.random.normal(jax.random.key(v), (32, 28, 28, 1)))
           for v in (1, 2)}
  # The gradients themselves, leaf by leaf, from one state on both layouts.
  method, step_fn, init_fn, _ = step_lib.build(c, steps_per_epoch=10, channels=1)
  grads = []
  for devices in (jax.devices()[:1], jax.devices()[:8]):
    mesh = Mesh(np.array(devices), ('data',))
    rep, data = parallel.replicated(mesh), parallel.batch_sharding(mesh)
    state = jax.jit(init_fn, out_shardings=rep)(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
    g = jax.jit(jax.grad(lambda p, b: method.loss(p, state, state.momentum_params, b, None)[0]),
                in_shardings=(rep, data), out_shardings=rep)(state.params, jax.device_put(batch, data))
    grads.append(jax.device_get(g))
  # Tolerance 1e-5 of the gradient's scale: the 8-way sums add the same numbers in another
  # order. (The qkv key bias has an exactly-zero true gradient: both sides are noise there.)
  scale = max(np.abs(g).max() for g in jax.tree.leaves(grads[0]))
  eight = dict(jax.tree_util.tree_leaves_with_path(grads[1]))
  for path, g1 in jax.tree_util.tree_leaves_with_path(grads[0]):
    np.testing.assert_allclose(eight[path], g1, rtol=1e-5, atol=1e-5 * scale,
                               err_msg=jax.tree_util.keystr(path))

  s1, m1 = _step_on_mesh(c, jax.devices()[:1], batch)
  s8, m8 = _step_on_mesh(c, jax.devices()[:8], batch)
  assert s8.params['backbone']['blocks_0']['fc1']['kernel'].sharding.mesh.size == 8
  for a, b in zip(m1, m8):  # loss and gradient norms of 3 steps
    for k in ('loss', 'grad_norm', 'grad_max/first_layer', 'grad_max/last_block'):
      np.testing.assert_allclose(a[k], b[k], rtol=1e-5, err_msg=k)
  # Parameters and BN statistics (over the global batch on 8 devices as on 1) after 3 steps,
  # where the rounding differences of each step have compounded through the next.
  for tree in ('params', 'batch_stats', 'momentum_params'):
    for x, y in zip(jax.tree.leaves(getattr(s1, tree)), jax.tree.leaves(getattr(s8, tree))):
      np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5, err_msg=tree)


def _run(config, workdir, **overrides):
  c = config.copy_and_resolve_references()
  for k, v in overrides.items():
    c[k] = v
  return train.train_and_evaluate(c, str(workdir))


def _losses(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f]
  return {r['step']: r['loss'] for r in rows if 'loss' in r}


@needs_fmnist
def test_twenty_steps_on_fashion_mnist_learn_and_resume(tiny_config, tmp_path):
  c = tiny_config
  c.total_steps, c.warmup_epochs, c.optimizer.base_lr = 20, 0.0, 2e-3
  c.log_every_steps, c.checkpoint_every_steps = 1, 10
  c.eval.knn_every_epochs, c.eval.knn_at_end = 0, True
  full = _run(c, tmp_path / 'full')
  losses = _losses(tmp_path / 'full')
  assert sorted(losses) == list(range(1, 21))
  first, last = np.mean([losses[s] for s in (1, 2, 3)]), np.mean([losses[s] for s in (18, 19, 20)])
  assert last < first - 0.1, (first, last)
  assert 0.1 < full['knn/top1@20'] <= 1.0

  # Stop after 10 steps ("preempted"), then rerun the same command: it resumes at step 10 and
  # reproduces the uninterrupted run's losses exactly (batches are a function of seed and step).
  _run(c, tmp_path / 'resumed', stop_after_steps=10)
  assert sorted(_losses(tmp_path / 'resumed')) == list(range(1, 11))
  resumed = _run(c, tmp_path / 'resumed')
  again = _losses(tmp_path / 'resumed')
  for s in range(11, 21):
    assert again[s] == losses[s], (s, again[s], losses[s])
  # The resumed run's kNN (a second run's sharded evaluation in this process) is the same.
  assert resumed['knn/top1@20'] == full['knn/top1@20']

  # A different run-defining config in the same workdir is refused before anything compiles.
  with pytest.raises(ValueError, match='batch_size'):
    _run(c, tmp_path / 'resumed', batch_size=64)


def test_batch_not_divisible_by_devices_is_a_clear_error(tiny_config, tmp_path):
  if jax.device_count() < 2:
    pytest.skip('needs several devices')
  tiny_config.batch_size = jax.device_count() * 4 + 1
  with pytest.raises(ValueError, match='config.batch_size=.*not divisible'):
    train.train_and_evaluate(tiny_config, str(tmp_path))


def test_unknown_model_and_missing_data_are_clear_errors(tiny_config, tmp_path):
  c = tiny_config.copy_and_resolve_references()
  c.model.name = 'convnext'
  with pytest.raises(ValueError, match='model.name'):
    train.train_and_evaluate(c, str(tmp_path))
  c = tiny_config.copy_and_resolve_references()
  c.data.data_dir = str(tmp_path / 'nowhere')
  with pytest.raises(FileNotFoundError, match='nowhere'):
    train.train_and_evaluate(c, str(tmp_path / 'w'))


def test_online_probe_learns_without_touching_the_encoder(tiny_config):
  c = tiny_config
  c.warmup_epochs, c.optimizer.base_lr, c.online_probe.lr = 0.0, 1e-2, 1e-1
  states = {}
  for classes in (0, 3):  # 0: no probe
    _, step_fn, init_fn, _ = step_lib.build(c, steps_per_epoch=10, channels=1, num_classes=classes)
    state = jax.jit(init_fn)(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
    step = jax.jit(step_fn)
    for i in range(3):
      batch = {f'view{v}': jax.random.normal(jax.random.key(10 * i + v), (32, 28, 28, 1))
               for v in (1, 2)}
      batch['label'] = jnp.arange(32) % 3
      state, metrics = step(state, batch)
    states[classes] = (state, metrics)
  (plain, _), (probed, m) = states[0], states[3]
  assert plain.probe is None and probed.probe['params']['kernel'].shape == (32, 3)
  assert np.any(probed.probe['params']['kernel'])
  assert 'probe/loss' in m
  for x, y in zip(jax.tree.leaves(plain.params), jax.tree.leaves(probed.params)):
    np.testing.assert_array_equal(x, y)
