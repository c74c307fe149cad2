"""MoCo v3 (Chen, Xie & He, "An Empirical Study of Training Self-Supervised Vision Transformers").

q = predictor(projector(backbone(x))) from the base encoder, k = projector(backbone(x)) from the
momentum encoder under stop_gradient. With q and k L2-normalised over the global batch,
  ctr(q, k) = CE(q k^T / tau, labels = diagonal) * 2 tau,   loss = ctr(q1, k2) + ctr(q2, k1).
This file is the only place the v3 objective is computed; step.py does the rest of the step.
"""

import jax
import jax.numpy as jnp

from mocojax.methods import base


def contrastive_loss(q, k, temperature):
  """InfoNCE over the global batch with the diagonal as positives, scaled by 2 tau."""
  q = base.l2_normalize(q.astype(jnp.float32))
  k = base.l2_normalize(k.astype(jnp.float32))
  logits = q @ k.T / temperature
  positives = jnp.diagonal(logits)
  return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - positives) * 2.0 * temperature


class MoCoV3(base.BaseAndMomentum):
  """Builds the two encoders from the config and computes the v3 loss."""

  @staticmethod
  def config_problems(config) -> list:
    # validate.py's general checks cover the rest.
    return base.needs(config, 'temperature', 'v3 divides its logits by it: set it, e.g. 0.2 '
                      '(ViT) or 1.0 (ResNet)')

  def __init__(self, config, dtype=jnp.float32):
    super().__init__(config, dtype)
    self.temperature = config.temperature

  def loss(self, params, state: base.StepState, momentum_params, batch, rng):
    """Loss of one step. `momentum_params` are already updated for this step.

    Returns (loss, aux) with aux = base.Aux (no extra metrics).
    """
    del rng
    (q1, q2), (k1, k2), aux = self.forward(params, state, momentum_params, batch)
    loss = contrastive_loss(q1, k2, self.temperature) + contrastive_loss(q2, k1, self.temperature)
    return loss, base.Aux(metrics={}, **aux)
