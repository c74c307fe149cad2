"""SimCLR and BYOL as method plug-ins: their losses against hand-written numpy, their steps on 1
and 8 devices, BYOL's target an exact EMA, SimCLR without a momentum encoder, the registry."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from configs import common
from mocojax import methods, validate
from mocojax import step as step_lib
from mocojax.methods import byol, simclr

STEPS = 3


# ------------------------------------------------------------------------------ numpy losses
def _unit(x):
  x = np.asarray(x, np.float64)
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def _np_nt_xent(z1, z2, tau):
  """SimCLR's l(i, j), written out over the 2N samples, averaged."""
  z = _unit(np.concatenate([z1, z2]))
  n2 = len(z)
  total = 0.0
  for i in range(n2):
    j = (i + n2 // 2) % n2  # the other view of sample i
    denominator = sum(np.exp(z[i] @ z[k] / tau) for k in range(n2) if k != i)
    total += -np.log(np.exp(z[i] @ z[j] / tau) / denominator)
  return total / n2


def _np_byol(p1, p2, z1, z2):
  """Squared distances of the unit vectors, mean over the batch, both directions summed."""
  def reg(p, z):
    return np.mean(np.sum((_unit(p) - _unit(z)) ** 2, axis=1))
  return reg(p1, z2) + reg(p2, z1)


@pytest.mark.parametrize('n, tau', [(6, 0.1), (6, 0.5), (3, 1.0), (1, 0.1)])
def test_nt_xent_matches_numpy(n, tau):
  z1, z2 = np.random.default_rng(n).normal(size=(2, n, 5))
  got = float(simclr.nt_xent(jnp.asarray(z1), jnp.asarray(z2), tau))
  np.testing.assert_allclose(got, _np_nt_xent(z1, z2, tau), rtol=1e-5, atol=1e-6)
  if n == 1:  # no negatives: each sample's positive is its whole denominator
    assert got == pytest.approx(0.0, abs=1e-6)


def test_byol_regression_loss_matches_numpy():
  rng = np.random.default_rng(1)
  p1, p2, z1, z2 = (rng.normal(size=(6, 5)) for _ in range(4))
  got = byol.regression_loss(*map(jnp.asarray, (p1, z2))) + byol.regression_loss(
      *map(jnp.asarray, (p2, z1)))
  np.testing.assert_allclose(float(got), _np_byol(p1, p2, z1, z2), rtol=1e-5)
  # Aligned vectors cost nothing, whatever their lengths; opposite ones cost 4 per direction.
  np.testing.assert_allclose(float(byol.regression_loss(jnp.asarray(z1), 3 * jnp.asarray(z1))),
                             0.0, atol=1e-6)
  np.testing.assert_allclose(float(byol.regression_loss(jnp.asarray(z1), -jnp.asarray(z1))),
                             4.0, rtol=1e-6)


# -------------------------------------------------------------------------- the method losses
def _views():
  return (jax.random.normal(jax.random.key(0), (8, 28, 28, 1)),
          jax.random.normal(jax.random.key(1), (8, 28, 28, 1)))


def _head_output(module, params, batch_stats, x):
  out, _ = module.apply({'params': params, 'batch_stats': batch_stats}, x, train=True,
                        mutable=['batch_stats'])
  return np.asarray(out[1], np.float64)


def test_simclr_loss_is_nt_xent_of_its_encoder_and_it_has_no_momentum_encoder(tiny_config):
  method = methods.build_method(common.simclr(tiny_config))
  x1, x2 = _views()
  v = method.init(jax.random.key(2), x1)
  assert v['momentum_params'] == {} and v['momentum_batch_stats'] == {}
  assert set(v['params']) == {'backbone', 'projector'}  # no predictor
  state = types.SimpleNamespace(batch_stats=v['batch_stats'], momentum_batch_stats={},
                                method_state={})
  loss, aux = method.loss(v['params'], state, {}, {'view1': x1, 'view2': x2}, None)
  z1, z2 = (_head_output(method.encoder, v['params'], v['batch_stats'], x) for x in (x1, x2))
  np.testing.assert_allclose(float(loss), _np_nt_xent(z1, z2, 0.1), rtol=1e-5)
  assert aux['momentum_batch_stats'] == {} and aux['features'].shape == (8, 32)


def test_byol_loss_regresses_the_target_and_no_gradient_reaches_it(tiny_config):
  method = methods.build_method(common.byol(tiny_config))
  x1, x2 = _views()
  v = method.init(jax.random.key(2), x1)
  assert set(v['momentum_params']) == {'backbone', 'projector'}  # the target has no predictor
  # Move the target away from the online network so the two are distinguishable.
  mparams = jax.tree.map(lambda p: p * 0.9, v['momentum_params'])
  state = types.SimpleNamespace(batch_stats=v['batch_stats'],
                                momentum_batch_stats=v['momentum_batch_stats'], method_state={})
  batch = {'view1': x1, 'view2': x2}
  loss, _ = method.loss(v['params'], state, mparams, batch, None)
  p1, p2 = (_head_output(method.base, v['params'], v['batch_stats'], x) for x in (x1, x2))
  z1, z2 = (_head_output(method.momentum, mparams, v['momentum_batch_stats'], x)
            for x in (x1, x2))
  np.testing.assert_allclose(float(loss), _np_byol(p1, p2, z1, z2), rtol=1e-5)
  g = jax.grad(lambda mp: method.loss(v['params'], state, mp, batch, None)[0])(mparams)
  assert all(not np.any(x) for x in jax.tree.leaves(g))


# --------------------------------------------------------------- steps on 1 and 8 devices
@pytest.fixture(scope='module')
def runs(make_tiny_config):
  """STEPS steps of each method on 1 and on 8 devices, as the trainer sets them up; the 1-device
  run keeps a host copy of the state before every step (the step donates its input)."""
  if jax.device_count() < 8:
    pytest.skip('needs 8 devices: XLA_FLAGS=--xla_force_host_platform_device_count=8')
  batch = {f'view{v}': np.asarray(jax.random.normal(jax.random.key(v), (32, 28, 28, 1)))
           for v in (1, 2)}
  out = {}
  for name, recipe in (('simclr', common.simclr), ('byol', common.byol)):
    c = recipe(make_tiny_config())
    # SGD: parameter updates are linear in the gradients (see test_train's 1 vs 8 devices).
    c.warmup_epochs, c.optimizer.base_lr, c.optimizer.name = 0.0, 1e-1, 'sgd'
    for n in (1, 8):
      setup = step_lib.setup(c, Mesh(np.array(jax.devices()[:n]), ('data',)),
                             steps_per_epoch=10, channels=1)
      state, states, metrics = setup.init(jax.random.key(0)), [], []
      for _ in range(STEPS):
        states.append(jax.device_get(state))
        state, m = setup.step(state, jax.device_put(batch, setup.batch_sharding))
        metrics.append(jax.device_get(m))
      states.append(jax.device_get(state))
      out[name, n] = types.SimpleNamespace(states=states, metrics=metrics, setup=setup)
  return out


@pytest.mark.parametrize('name', ['simclr', 'byol'])
def test_steps_equal_on_1_and_8_devices(runs, name):
  one, eight = runs[name, 1], runs[name, 8]
  assert len({float(m['loss']) for m in one.metrics}) == STEPS  # the steps did change something
  for a, b in zip(one.metrics, eight.metrics):
    for k in ('loss', 'grad_norm'):
      np.testing.assert_allclose(a[k], b[k], rtol=1e-5, err_msg=k)
  for tree in ('params', 'batch_stats', 'momentum_params', 'momentum_batch_stats'):
    x, y = getattr(one.states[-1], tree), getattr(eight.states[-1], tree)
    assert jax.tree.structure(x) == jax.tree.structure(y), tree
    for a, b in zip(jax.tree.leaves(x), jax.tree.leaves(y)):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=tree)


def test_byol_target_is_an_exact_ema_on_the_momentum_schedule(runs):
  run = runs['byol', 1]
  for t in range(STEPS):
    m = np.float32(run.metrics[t]['momentum'])
    # 0.99 -> 1 over the run, cosine.
    total = run.setup.total_steps
    np.testing.assert_allclose(m, 1 - 0.01 * (1 + np.cos(np.pi * t / total)) / 2, rtol=1e-6)
    before, after = run.states[t], run.states[t + 1]
    base = {k: before.params[k] for k in before.momentum_params}
    for k, q, got in zip(*(jax.tree.leaves(tree) for tree in (
        before.momentum_params, base, after.momentum_params))):
      mk, mq = np.float64(m) * k, (1 - np.float64(m)) * q
      # m k + (1 - m) q to float32 rounding (XLA may fuse the multiply-add, or round the
      # schedule's m otherwise): within 2 eps of the terms' size, also where they cancel.
      bound = 2 * np.finfo(np.float32).eps * (np.abs(mk) + np.abs(mq))
      assert np.all(np.abs(got - (mk + mq)) <= bound)


def test_simclr_state_has_no_momentum_encoder(runs):
  run = runs['simclr', 1]
  abstract = run.setup.abstract_state
  assert abstract.momentum_params == {} and abstract.momentum_batch_stats == {}
  assert all(s.momentum_params == {} and s.momentum_batch_stats == {} for s in run.states)
  assert all('momentum' not in m for m in run.metrics)  # no schedule to log


# -------------------------------------------------------------------------------- registry
def test_registry_rejects_an_unknown_method_naming_the_choices(tiny_config):
  tiny_config.method = 'simsiam'
  for build in (methods.build_method,
                lambda c: step_lib.build(c, steps_per_epoch=10, channels=1)):
    with pytest.raises(validate.ConfigError) as err:
      build(tiny_config)
    assert "config.method='simsiam'" in str(err.value)
    assert all(repr(name) in str(err.value) for name in methods.METHODS)


def test_registry_and_validation_know_the_new_methods(tiny_config):
  assert {'simclr', 'byol'} <= set(methods.METHODS)
  for cls in methods.REGISTRY.values():  # what base.Method asks of each
    assert isinstance(cls.has_momentum_encoder, bool)
    assert all(callable(getattr(cls, f)) for f in ('config_problems', 'init', 'loss', 'features'))
  assert not methods.REGISTRY['simclr'].has_momentum_encoder
  assert methods.REGISTRY['byol'].has_momentum_encoder
  for recipe in (common.simclr, common.byol):
    validate.check(recipe(tiny_config.copy_and_resolve_references()))
