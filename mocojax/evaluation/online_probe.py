"""Online linear probe: a linear classifier trained alongside pretraining on stop-gradient
backbone features of the first augmented view, with the labels the dataset happens to have.

It never touches the encoder (the features arrive already stopped), costs one small matmul per
step, and gives a live quality signal between kNN evaluations; its test accuracy is logged with
each kNN evaluation. It is a monitor, not the reference linear-probe protocol (mocojax.linear).
"""

import jax
import jax.numpy as jnp
import optax


def optimizer(probe_config):
  return optax.adamw(probe_config.lr, weight_decay=probe_config.weight_decay)


def init(feature_dim: int, num_classes: int, tx):
  params = {'kernel': jnp.zeros((feature_dim, num_classes)), 'bias': jnp.zeros((num_classes,))}
  return {'params': params, 'opt_state': tx.init(params)}


def logits(params, features):
  return features.astype(jnp.float32) @ params['kernel'] + params['bias']


def update(probe, features, labels, tx):
  """One optimizer step of the probe; returns (probe, metrics)."""
  def loss_fn(params):
    out = logits(params, jax.lax.stop_gradient(features))
    return optax.softmax_cross_entropy_with_integer_labels(out, labels).mean(), out

  (loss, out), grads = jax.value_and_grad(loss_fn, has_aux=True)(probe['params'])
  updates, opt_state = tx.update(grads, probe['opt_state'], probe['params'])
  params = optax.apply_updates(probe['params'], updates)
  top1 = jnp.mean(jnp.argmax(out, -1) == labels)
  return {'params': params, 'opt_state': opt_state}, {'probe/loss': loss, 'probe/train_top1': top1}


@jax.jit
def accuracy(params, features, labels, mask):
  hits = (jnp.argmax(logits(params, features), -1) == labels) & mask
  return jnp.sum(hits) / jnp.maximum(jnp.sum(mask), 1)
