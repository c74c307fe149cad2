"""BYOL (Grill et al., "Bootstrap Your Own Latent: A New Approach to Self-Supervised Learning"),
as the MoCo v3 paper compares it on ViTs (its Table 4).

Online network: p = predictor(projector(backbone(x))); target network: z = projector(backbone(x))
with parameters an EMA of the online ones (the step's momentum encoder, config.momentum's
schedule), under stop_gradient. No negatives: with p and z L2-normalised,

  reg(p, z) = mean over the batch of ||p - z||^2 = 2 - 2 cos(p, z)
  loss = reg(p1, z2) + reg(p2, z1)

(the sum of both directions, as BYOL's symmetrised loss). The encoders, heads and BN handling
are MoCo v3's (base.BaseAndMomentum); only the loss differs.
"""

import jax.numpy as jnp

from mocojax.methods import base


def regression_loss(p, z):
  """BYOL's normalised MSE, 2 - 2 cos(p, z), averaged over the (global) batch."""
  p = base.l2_normalize(p.astype(jnp.float32))
  z = base.l2_normalize(z.astype(jnp.float32))
  return jnp.mean(2.0 - 2.0 * jnp.sum(p * z, axis=-1))


class BYOL(base.BaseAndMomentum):
  """Online and target (momentum) encoders and the regression loss."""

  @staticmethod
  def config_problems(config) -> list:
    del config  # validate.py's general checks cover every setting BYOL reads
    return []

  def loss(self, params, state: base.StepState, momentum_params, batch, rng):
    """(loss, base.Aux) of one step; `momentum_params` are already updated for this step."""
    del rng
    (p1, p2), (z1, z2), aux = self.forward(params, state, momentum_params, batch)
    return regression_loss(p1, z2) + regression_loss(p2, z1), base.Aux(metrics={}, **aux)
