"""SimCLR (Chen, Kornblith, Norouzi & Hinton, "A Simple Framework for Contrastive Learning of
Visual Representations"), as the MoCo v3 paper compares it on ViTs (its Table 4).

One encoder, no momentum encoder, no predictor: z = projector(backbone(x)) for both views (the
projector of config.head, as MoCo v3's). The 2N embeddings of the global batch, L2-normalised,
give the cosine similarities s_ij / tau; each one's positive is its other view and the other
2N - 2 are its negatives (the self-similarity s_ii is masked out):

  l(i, j) = -log( exp(s_ij / tau) / sum_{k != i} exp(s_ik / tau) ),   loss = mean over all 2N i

(NT-Xent). Each view is a separate call, as in MoCo v3, so the projector's BN statistics are
per view.
"""

import jax
import jax.numpy as jnp

from mocojax.methods import base


def nt_xent(z1, z2, temperature):
  """NT-Xent over the 2N samples of both views of the global batch (z1, z2: [N, D])."""
  n = z1.shape[0]
  z = base.l2_normalize(jnp.concatenate([z1, z2]).astype(jnp.float32))
  logits = z @ z.T / temperature
  # exp(-inf) = 0: a sample is never its own negative; the mask carries no gradient.
  logits = jnp.where(jnp.eye(2 * n, dtype=bool), -jnp.inf, logits)
  # Row i < N pairs with column i + N, row N + i with column i.
  positives = jnp.concatenate([jnp.diagonal(logits, n), jnp.diagonal(logits, -n)])
  return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - positives)


class SimCLR:
  """One encoder (backbone -> projector) and the NT-Xent loss."""

  has_momentum_encoder = False

  @staticmethod
  def config_problems(config) -> list:
    # validate.py's general checks cover the rest.
    return base.needs(config, 'temperature', 'SimCLR divides its similarities by it: set it, '
                      'e.g. 0.1')

  def __init__(self, config, dtype=jnp.float32):
    self.encoder = base.mlp_encoder(config, dtype, predictor=False)
    self.temperature = config.temperature

  def init(self, rng, images) -> base.Variables:
    return base.with_momentum_copy(self.encoder.init(rng, images, train=True), ())

  def loss(self, params, state: base.StepState, momentum_params, batch, rng):
    """(loss, base.Aux) of one step; `momentum_params` is {} and unused."""
    del momentum_params, rng
    bs = state.batch_stats
    (f1, z1), bs = base.apply_train(self.encoder, params, bs, batch['view1'])
    (_, z2), bs = base.apply_train(self.encoder, params, bs, batch['view2'])
    return nt_xent(z1, z2, self.temperature), base.Aux(
        batch_stats=bs, momentum_batch_stats=state.momentum_batch_stats,
        method_state=state.method_state, metrics={},
        # For the online linear probe, which must never move the encoder.
        features=jax.lax.stop_gradient(f1))

  def features(self, variables, images):
    """Backbone features in inference mode (kNN, linear probe, export)."""
    return base.backbone_features(self.encoder, variables, images)
