"""The MoCo v3 objective and heads against hand-written numpy."""

import jax
import jax.numpy as jnp
import numpy as np

from mocojax.methods import mocov3
from mocojax.models import heads


def _np_ctr(q, k, tau):
  q = q / np.linalg.norm(q, axis=1, keepdims=True)
  k = k / np.linalg.norm(k, axis=1, keepdims=True)
  logits = q @ k.T / tau
  loss = 0.0
  for i in range(len(q)):  # cross-entropy with label i, written out
    loss += -logits[i, i] + np.log(np.sum(np.exp(logits[i])))
  return loss / len(q) * 2 * tau


def test_contrastive_loss_matches_numpy():
  rng = np.random.default_rng(0)
  q, k = rng.normal(size=(6, 5)), rng.normal(size=(6, 5))
  for tau in (0.2, 1.0):
    got = float(mocov3.contrastive_loss(jnp.asarray(q), jnp.asarray(k), tau))
    np.testing.assert_allclose(got, _np_ctr(q, k, tau), rtol=1e-5)


def test_loss_is_symmetric_over_views_and_uses_stopped_keys(tiny_config):
  method = mocov3.MoCoV3(tiny_config)
  x1 = jax.random.normal(jax.random.key(0), (8, 28, 28, 1))
  x2 = jax.random.normal(jax.random.key(1), (8, 28, 28, 1))
  v = method.init(jax.random.key(2), x1)
  # Move the momentum encoder away from the base one so the two are distinguishable.
  mparams = jax.tree.map(lambda p: p * 0.9, v['momentum_params'])

  class S:
    batch_stats, momentum_batch_stats, method_state = v['batch_stats'], v['momentum_batch_stats'], {}

  loss, _ = method.loss(v['params'], S, mparams, {'view1': x1, 'view2': x2}, None)

  def fwd(module, params, bs, x):
    return np.asarray(module.apply({'params': params, 'batch_stats': bs}, x, train=True,
                                   mutable=['batch_stats'])[0][1], np.float64)
  q1, q2 = (fwd(method.base, v['params'], v['batch_stats'], x) for x in (x1, x2))
  k1, k2 = (fwd(method.momentum, mparams, v['momentum_batch_stats'], x) for x in (x1, x2))
  want = _np_ctr(q1, k2, 0.2) + _np_ctr(q2, k1, 0.2)
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)
  # No gradient reaches the momentum parameters.
  g = jax.grad(lambda mp: method.loss(v['params'], S, mp, {'view1': x1, 'view2': x2}, None)[0])(mparams)
  assert all(not np.any(x) for x in jax.tree.leaves(g))


def test_vit_heads_structure(tiny_config):
  method = mocov3.MoCoV3(tiny_config)
  v = method.init(jax.random.key(0), jnp.zeros((4, 28, 28, 1)))
  proj, pred = v['params']['projector'], v['params']['predictor']
  assert sorted(proj) == ['bn_0', 'bn_1', 'linear_0', 'linear_1', 'linear_2']  # 3 layers, last BN
  assert 'bn_2' not in proj and 'bn_2' in v['batch_stats']['projector']  # last BN: no scale/bias
  assert sorted(pred) == ['bn_0', 'linear_0', 'linear_1']
  assert 'bn_1' in v['batch_stats']['predictor']
  assert all('bias' not in layer for name, layer in proj.items() if name.startswith('linear'))
  assert proj['linear_0']['kernel'].shape == (32, 64) and proj['linear_2']['kernel'].shape == (64, 32)
  assert set(v['momentum_params']) == {'backbone', 'projector'}


def test_mlp_without_last_bn_and_torch_init():
  mlp = heads.MLP(num_layers=2, hidden_dim=300, out_dim=7, last_bn=False)
  x = jax.random.normal(jax.random.key(0), (16, 200))
  v = mlp.init(jax.random.key(1), x, train=True)
  assert set(v['batch_stats']) == {'bn_0'}
  w = np.asarray(v['params']['linear_0']['kernel'])
  limit = 1 / np.sqrt(200)  # PyTorch's default Linear init
  assert np.abs(w).max() <= limit and np.abs(w).max() > 0.97 * limit


def test_bn_normalises_each_view_over_the_batch():
  mlp = heads.MLP(num_layers=1, hidden_dim=8, out_dim=8, last_bn=True)
  x = jax.random.normal(jax.random.key(0), (32, 8)) * 3 + 5
  v = mlp.init(jax.random.key(1), x, train=True)
  y, _ = mlp.apply(v, x, train=True, mutable=['batch_stats'])
  np.testing.assert_allclose(np.mean(y, 0), 0, atol=1e-5)
  np.testing.assert_allclose(np.var(y, 0), 1, atol=1e-3)  # biased variance, eps 1e-5
