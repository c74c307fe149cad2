"""Learning-rate and momentum schedules, the EMA, and the optimizers' parameter handling."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mocojax import momentum, optim
from mocojax import step as step_lib


def test_lr_schedule_endpoints_and_batch_scaling(tiny_config):
  c = tiny_config
  c.optimizer.base_lr, c.epochs, c.warmup_epochs = 1.5e-4, 10.0, 2.0
  c.batch_size = 512
  spe = 100
  lr = optim.learning_rate_schedule(c, spe)
  peak = 1.5e-4 * 512 / 256
  assert float(lr(0)) == 0.0
  np.testing.assert_allclose(float(lr(100)), peak / 2, rtol=1e-6)  # half-way through warmup
  np.testing.assert_allclose(float(lr(200)), peak, rtol=1e-6)
  np.testing.assert_allclose(float(lr(600)), peak / 2, rtol=1e-5)  # half-way down the cosine
  assert abs(float(lr(1000))) < 1e-12
  # Epoch-based durations follow a batch-size override: 4x the batch, 1/4 the steps.
  assert optim.schedule_steps(c, spe // 4) == (50, 250)


@pytest.mark.parametrize('warmup_epochs', [0.0, 1.0])
def test_fine_tuning_lr_ends_at_min_lr(warmup_epochs):
  from configs import finetune_demo
  from mocojax.downstream import fine_tuning
  c = finetune_demo.get_config()
  c.base_lr, c.batch_size, c.epochs, c.warmup_epochs, c.min_lr = 1e-3, 512, 4.0, warmup_epochs, 1e-6
  lr, total = fine_tuning.learning_rate_schedule(c, 10)
  peak, warmup = 1e-3 * 2, int(warmup_epochs * 10)
  assert total == 40 and float(lr(0)) == pytest.approx(peak if warmup == 0 else 0.0, rel=1e-6)
  np.testing.assert_allclose(float(lr(warmup)), peak, rtol=1e-6)
  np.testing.assert_allclose(float(lr((warmup + 40) / 2)), (peak + 1e-6) / 2, rtol=1e-5)
  np.testing.assert_allclose(float(lr(40)), 1e-6, rtol=1e-4)


def test_momentum_schedule_endpoints():
  m = momentum.momentum_schedule(0.99, 1000, cosine=True)
  np.testing.assert_allclose(float(m(0)), 0.99, rtol=1e-7)
  np.testing.assert_allclose(float(m(500)), 0.995, rtol=1e-7)
  np.testing.assert_allclose(float(m(1000)), 1.0, rtol=1e-7)
  values = np.array([float(m(t)) for t in range(0, 1001, 50)])
  assert np.all(np.diff(values) > 0)
  assert float(momentum.momentum_schedule(0.999, 1000, cosine=False)(700)) == pytest.approx(0.999)


def _train_a_few_steps(config, steps=4):
  method, step_fn, init_fn, _ = step_lib.build(config, steps_per_epoch=10, channels=1)
  state = jax.jit(init_fn)(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
  step = jax.jit(step_fn)
  history = [state]
  for i in range(steps):
    batch = {f'view{v}': jax.random.normal(jax.random.key(10 * i + v), (config.batch_size, 28, 28, 1))
             for v in (1, 2)}
    state, metrics = step(state, batch)
    history.append(state)
  return history, metrics, step_fn


@pytest.mark.parametrize('name', ['adamw', 'lars', 'sgd', 'lamb'])
def test_frozen_patch_projection_is_bit_identical(tiny_config, name):
  c = tiny_config
  c.optimizer.name, c.optimizer.weight_decay, c.optimizer.base_lr = name, 0.1, 1e-2
  c.warmup_epochs = 0.0
  assert c.model.stop_grad_patch_embed
  history, _, _ = _train_a_few_steps(c)
  first, last = history[0].params, history[-1].params
  for leaf in ('kernel', 'bias'):
    np.testing.assert_array_equal(first['backbone']['patch_embed'][leaf],
                                  last['backbone']['patch_embed'][leaf])
  # ... while the trained layers did move.
  assert not np.array_equal(first['backbone']['blocks_0']['fc1']['kernel'],
                            last['backbone']['blocks_0']['fc1']['kernel'])


def test_patch_projection_trains_when_not_frozen(tiny_config):
  c = tiny_config
  c.model.stop_grad_patch_embed = False
  c.warmup_epochs, c.optimizer.base_lr = 0.0, 1e-2
  history, metrics, _ = _train_a_few_steps(c, steps=2)
  assert not np.array_equal(history[0].params['backbone']['patch_embed']['kernel'],
                            history[-1].params['backbone']['patch_embed']['kernel'])
  assert float(metrics['grad_max/first_layer']) > 0


def test_momentum_encoder_is_the_closed_form_ema(tiny_config):
  c = tiny_config
  c.warmup_epochs, c.optimizer.base_lr, c.epochs = 0.0, 1e-2, 1.0  # 10 steps: m moves visibly
  n = 5
  history, _, _ = _train_a_few_steps(c, steps=n)
  sched = momentum.momentum_schedule(c.momentum.base, 10, cosine=True)
  ms = [float(sched(t)) for t in range(n)]
  # theta_k(n) = prod(m) theta_q(0) + sum_t (1 - m_t) prod_{s>t} m_s theta_q(t),
  # with theta_q(t) the base parameters *before* step t (the key update comes first).
  def closed_form(*qs):
    total = np.prod(ms) * np.asarray(qs[0], np.float64)
    for t in range(n):
      total = total + (1 - ms[t]) * np.prod(ms[t + 1:]) * np.asarray(qs[t], np.float64)
    return total
  base = [{k: h.params[k] for k in ('backbone', 'projector')} for h in history[:n]]
  want = jax.tree.map(closed_form, *base)
  got = history[n].momentum_params
  for w, g in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
  # And the EMA really lags: the momentum encoder differs from the base one.
  assert not np.allclose(got['projector']['linear_0']['kernel'],
                         history[n].params['projector']['linear_0']['kernel'])


def test_lars_skips_1d_parameters_and_matches_reference_formula():
  params = {'w': jnp.array([[3.0, 4.0]]), 'b': jnp.array([1.0, -1.0])}
  grads = {'w': jnp.array([[0.5, 0.0]]), 'b': jnp.array([0.2, 0.1])}
  tx = optim._lars(lr=0.1, weight_decay=0.01, momentum=0.9, trust_coefficient=0.001)
  updates, _ = tx.update(grads, tx.init(params), params)
  dp = np.array([[0.5, 0.0]]) + 0.01 * np.array([[3.0, 4.0]])
  q = 0.001 * 5.0 / np.linalg.norm(dp)
  np.testing.assert_allclose(updates['w'], -0.1 * q * dp, rtol=1e-6)
  np.testing.assert_allclose(updates['b'], -0.1 * np.array([0.2, 0.1]), rtol=1e-6)


def test_unknown_optimizer_is_a_clear_error(tiny_config):
  tiny_config.optimizer.name = 'adam8bit'
  with pytest.raises(ValueError, match='optimizer.name'):
    optim.build_optimizer(tiny_config, {'w': jnp.ones(2)}, 10)
