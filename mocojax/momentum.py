"""The momentum (key) encoder: an exponential moving average of the base encoder's parameters.

theta_k <- m * theta_k + (1 - m) * theta_q over parameters only (BN running statistics of the
momentum encoder come from its own forward passes, as in the reference). m follows
m(t) = 1 - (1 - m0) * (1 + cos(pi * t / T)) / 2 per step in MoCo v3 (m0 at t=0, 1 at t=T), and
stays at m0 in v1/v2. The momentum parameters never enter the optimizer.
"""

import jax
import jax.numpy as jnp


def momentum_schedule(base: float, total_steps: int, cosine: bool):
  """Returns step -> m (jnp scalar)."""
  def schedule(step):
    if not cosine:
      return jnp.asarray(base, jnp.float32)
    frac = jnp.asarray(step, jnp.float32) / total_steps
    return 1.0 - (1.0 - base) * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))
  return schedule


def ema_update(momentum_params, params, m):
  """One EMA step; `params` may hold more entries (e.g. the predictor) than the momentum tree."""
  subset = {k: params[k] for k in momentum_params}
  return jax.tree.map(lambda k, q: m * k + (1.0 - m) * q, momentum_params, subset)
