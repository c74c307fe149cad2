"""MoCo v3 (Chen, Xie & He, "An Empirical Study of Training Self-Supervised Vision Transformers").

q = predictor(projector(backbone(x))) from the base encoder, k = projector(backbone(x)) from the
momentum encoder under stop_gradient. With q and k L2-normalised over the global batch,
  ctr(q, k) = CE(q k^T / tau, labels = diagonal) * 2 tau,   loss = ctr(q1, k2) + ctr(q2, k1).
This file is the only place the v3 objective is computed; train.py does the rest of the step.
"""

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from mocojax import models
from mocojax.models import heads


class Encoder(nn.Module):
  """backbone -> projector (-> predictor). Without a predictor it is the momentum encoder."""
  backbone: nn.Module
  projector: nn.Module
  predictor: Optional[nn.Module] = None

  def __call__(self, images, train: bool = True):
    """Returns (backbone features, head output)."""
    features = self.backbone(images, train=train)
    z = self.projector(features, train=train)
    return features, (self.predictor(z, train=train) if self.predictor is not None else z)


def l2_normalize(x, eps=1e-12):
  # F.normalize: x / max(||x||, eps).
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def contrastive_loss(q, k, temperature):
  """InfoNCE over the global batch with the diagonal as positives, scaled by 2 tau."""
  q = l2_normalize(q.astype(jnp.float32))
  k = l2_normalize(k.astype(jnp.float32))
  logits = q @ k.T / temperature
  positives = jnp.diagonal(logits)
  return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - positives) * 2.0 * temperature


def head_dims(config):
  h = config.head
  return h.hidden_dim, h.out_dim


class MoCoV3:
  """Builds the two encoders from the config and computes the v3 loss."""

  # Sub-trees of the base parameters that the momentum encoder averages.
  momentum_keys = ('backbone', 'projector')

  def __init__(self, config, dtype=jnp.float32):
    hidden, out = head_dims(config)
    h = config.head

    def encoder(with_predictor):
      return Encoder(
          backbone=models.build_backbone(config.model, dtype),
          projector=heads.MLP(h.proj_layers, hidden, out, last_bn=True, dtype=dtype),
          predictor=(heads.MLP(h.pred_layers, hidden, out, last_bn=h.pred_last_bn, dtype=dtype)
                     if with_predictor else None))

    self.base = encoder(True)
    self.momentum = encoder(False)
    self.temperature = config.temperature

  def init(self, rng, images):
    """Variables of both encoders; the momentum encoder starts as a copy of the base one."""
    variables = self.base.init(rng, images, train=True)
    params = variables['params']
    batch_stats = variables.get('batch_stats', {})
    momentum_params = {k: params[k] for k in self.momentum_keys}
    momentum_batch_stats = {k: batch_stats[k] for k in self.momentum_keys if k in batch_stats}
    return dict(params=params, batch_stats=batch_stats, momentum_params=momentum_params,
                momentum_batch_stats=momentum_batch_stats, method_state={})

  def _apply(self, module, params, batch_stats, images):
    out, updates = module.apply({'params': params, 'batch_stats': batch_stats}, images,
                                train=True, mutable=['batch_stats'])
    return out, updates.get('batch_stats', batch_stats)

  def loss(self, params, state: Any, momentum_params, batch, rng):
    """Loss of one step. `momentum_params` are already updated for this step.

    Returns (loss, aux) with aux = dict(batch_stats, momentum_batch_stats, method_state, metrics).
    Each view is a separate call, so BN statistics are per view, and BN running statistics are
    threaded through the calls in the order the reference makes them.
    """
    del rng
    x1, x2 = batch['view1'], batch['view2']
    bs = state.batch_stats
    (f1, q1), bs = self._apply(self.base, params, bs, x1)
    (_, q2), bs = self._apply(self.base, params, bs, x2)
    mbs = state.momentum_batch_stats
    (_, k1), mbs = self._apply(self.momentum, momentum_params, mbs, x1)
    (_, k2), mbs = self._apply(self.momentum, momentum_params, mbs, x2)
    k1, k2 = jax.lax.stop_gradient(k1), jax.lax.stop_gradient(k2)
    loss = contrastive_loss(q1, k2, self.temperature) + contrastive_loss(q2, k1, self.temperature)
    # features: for the online linear probe, which must never move the encoder.
    return loss, dict(batch_stats=bs, momentum_batch_stats=jax.lax.stop_gradient(mbs),
                      method_state=state.method_state, metrics={},
                      features=jax.lax.stop_gradient(f1))

  def features(self, variables, images):
    """Backbone features of the base encoder in inference mode (kNN, linear probe, export)."""
    return self.base.apply(variables, images, train=False,
                           method=lambda m, x, train: m.backbone(x, train=train))
