"""Batch norm with global / group statistics and shuffling BN, against hand-written numpy."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from mocojax import parallel
from mocojax.models import norm


def _np_bn(x, eps=norm.EPS):
  axes = tuple(range(x.ndim - 1))
  return (x - x.mean(axes)) / np.sqrt(x.var(axes) + eps)


def _np_group_bn(x, group_size):
  return np.concatenate([_np_bn(g) for g in np.split(x, len(x) // group_size)])


def _apply(x, stats, group_size=4, variables=None):
  bn = norm.BatchNorm(stats=stats, group_size=group_size)
  variables = variables or bn.init(jax.random.key(0), x)
  return bn.apply(variables, x, mutable=['batch_stats'])


def _data(shape=(16, 3, 3, 5), seed=0):
  rng = np.random.default_rng(seed)
  # Groups with different offsets, so that group and global statistics differ clearly.
  return (rng.normal(size=shape) * 2 + np.arange(shape[0]).reshape(-1, *[1] * (len(shape) - 1))
          ).astype(np.float32)


def test_global_bn_normalises_over_batch_and_space_like_flax():
  x = _data()
  y, upd = _apply(x, 'global')
  np.testing.assert_allclose(y, _np_bn(x.astype(np.float64)), atol=1e-5)
  # A drop-in for flax's BatchNorm with PyTorch's momentum and eps (same variable names too).
  fbn = nn.BatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-5)
  fy, fupd = fbn.apply(fbn.init(jax.random.key(0), x), x, mutable=['batch_stats'])
  np.testing.assert_allclose(y, fy, atol=1e-5)
  np.testing.assert_allclose(upd['batch_stats']['mean'], fupd['batch_stats']['mean'], rtol=1e-5)
  # The running variance is PyTorch's, unbiased (flax keeps the biased one).
  x64 = x.astype(np.float64)
  np.testing.assert_allclose(upd['batch_stats']['var'], 0.9 + 0.1 * x64.var((0, 1, 2), ddof=1),
                             rtol=1e-5)
  n = x.size // x.shape[-1]
  np.testing.assert_allclose(upd['batch_stats']['var'] - 0.9,
                             (fupd['batch_stats']['var'] - 0.9) * n / (n - 1), rtol=1e-5)


def test_group_bn_normalises_each_group_and_averages_running_stats():
  x = _data()
  y, upd = _apply(x, 'group', group_size=4)
  np.testing.assert_allclose(y, _np_group_bn(x.astype(np.float64), 4), atol=1e-5)
  groups = np.split(x.astype(np.float64), 4)
  mean = np.mean([g.mean((0, 1, 2)) for g in groups], 0)
  var = np.mean([g.var((0, 1, 2), ddof=1) for g in groups], 0)  # unbiased, as PyTorch stores
  np.testing.assert_allclose(upd['batch_stats']['mean'], 0.1 * mean, rtol=1e-5)
  np.testing.assert_allclose(upd['batch_stats']['var'], 0.9 + 0.1 * var, rtol=1e-5)
  # Inference uses the running statistics, not the batch.
  bn = norm.BatchNorm(use_running_average=True, stats='group', group_size=4)
  out = bn.apply({'params': {'scale': jnp.ones(5), 'bias': jnp.zeros(5)}, **upd}, x[:3])
  want = (x[:3] - upd['batch_stats']['mean']) / np.sqrt(upd['batch_stats']['var'] + 1e-5)
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)


def test_shuffling_bn_equals_permute_group_normalise_unpermute():
  x = _data()
  rng = jax.random.key(3)
  shuffled, unshuffle = norm.shuffle(rng, jnp.asarray(x))
  y, _ = _apply(shuffled, 'group', group_size=4)
  y = np.asarray(unshuffle(y))
  # The explicit reference: the same permutation, groups of the permuted batch, back in order.
  perm = np.asarray(norm.shuffle(rng, jnp.arange(len(x)))[0])
  assert sorted(perm) == list(range(16)) and not np.array_equal(perm, np.arange(16))
  np.testing.assert_array_equal(np.asarray(shuffled), x[perm])
  want = np.empty_like(x, dtype=np.float64)
  want[perm] = _np_group_bn(x[perm].astype(np.float64), 4)
  np.testing.assert_allclose(y, want, atol=1e-5)
  # ... which is not what unshuffled groups give: the shuffle changes each sample's group.
  assert not np.allclose(y, _np_group_bn(x.astype(np.float64), 4), atol=1e-2)


def test_group_size_must_divide_the_batch():
  with pytest.raises(ValueError, match='bn_group_size=5'):
    _apply(_data(), 'group', group_size=5, variables=norm.BatchNorm(stats='group').init(
        jax.random.key(0), _data()))
  with pytest.raises(ValueError, match='unknown'):
    _apply(_data(), 'per_device', variables=norm.BatchNorm().init(jax.random.key(0), _data()))


def test_group_bn_is_independent_of_the_device_count():
  if jax.device_count() < 8:
    pytest.skip('needs 8 devices')
  x = _data((32, 2, 2, 3))
  bn = norm.BatchNorm(stats='group', group_size=8)
  v = bn.init(jax.random.key(0), x)
  outs = []
  for n in (1, 8):  # 8 devices: each group of 8 spans two devices' shards
    mesh = Mesh(np.array(jax.devices()[:n]), ('data',))
    xs = jax.device_put(x, parallel.batch_sharding(mesh))
    f = jax.jit(lambda v, x: bn.apply(v, x, mutable=['batch_stats']))
    outs.append(jax.device_get(f(v, xs)))
  np.testing.assert_allclose(outs[0][0], outs[1][0], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(outs[0][0], _np_group_bn(x.astype(np.float64), 8), atol=1e-5)
  for k in ('mean', 'var'):
    np.testing.assert_allclose(outs[0][1]['batch_stats'][k], outs[1][1]['batch_stats'][k],
                               rtol=1e-5)
