"""Supervised pieces shared by the linear probe and fine-tuning (their input: data/labelled.py).

  LinearHeads      K independent Linear classifiers over the same features, optionally behind
                   a parameter-free BatchNorm (MAE's linear probe), so a learning-rate sweep
                   costs one backbone pass;
  cross_entropy    with label smoothing;
  count_correct    masked top-1 counts per head, for the padded evaluation batches.
"""

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax


class LinearClassifier(nn.Module):
  """[optional parameter-free BN] -> Linear, initialised N(0, 0.01) with zero bias.

  The BN (no scale, no shift, eps 1e-6) is MAE's: it whitens features whose scale differs
  across dimensions so one learning rate suits all; it keeps running statistics for eval.
  """
  num_classes: int
  feature_norm: bool = False
  kernel_init: Callable = nn.initializers.normal(0.01)

  @nn.compact
  def __call__(self, features, train: bool):
    x = features.astype(jnp.float32)
    if self.feature_norm:
      x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-6,
                       use_scale=False, use_bias=False, name='feature_norm')(x)
    return nn.Dense(self.num_classes, kernel_init=self.kernel_init,
                    bias_init=nn.initializers.zeros, name='linear')(x)


class LinearHeads(nn.Module):
  """`num_heads` independent LinearClassifiers on the same features: logits [K, B, classes].

  Every parameter (and BN statistic) gets a leading head axis, so one optimizer step updates
  all heads and per-head learning rates are a per-head scale of the update.
  """
  num_classes: int
  num_heads: int = 1
  feature_norm: bool = False

  @nn.compact
  def __call__(self, features, train: bool):
    heads = nn.vmap(LinearClassifier, variable_axes={'params': 0, 'batch_stats': 0},
                    split_rngs={'params': True}, in_axes=(None, None), out_axes=0,
                    axis_size=self.num_heads)
    return heads(self.num_classes, self.feature_norm, name='heads')(features, train)


def cross_entropy(logits, labels, label_smoothing: float = 0.0):
  """Mean over the last-but-one (batch) axis; logits [..., B, C], labels [B]."""
  targets = jax.nn.one_hot(labels, logits.shape[-1])
  if label_smoothing:
    targets = optax.smooth_labels(targets, label_smoothing)
  return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets).mean(axis=-1)


def count_correct(logits, labels, mask) -> Any:
  """Top-1 hits among rows with mask True; logits [..., B, C] -> [...] int32."""
  hit = (jnp.argmax(logits, axis=-1) == labels) & mask
  return jnp.sum(hit, axis=-1, dtype=jnp.int32)
