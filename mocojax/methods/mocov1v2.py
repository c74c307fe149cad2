"""MoCo v1 (He et al., "Momentum Contrast for Unsupervised Visual Representation Learning") and
v2 (Chen et al., "Improved Baselines with Momentum Contrastive Learning").

q = head(backbone(view1)) from the query encoder; k = head(backbone(view2)) from the key
(momentum) encoder under stop_gradient and shuffling BN; both L2-normalised. Against a queue
Q [K, dim] of keys from earlier steps, as it stands *before* this step's keys go in:

  logits = [q . k, q Q^T] / tau   (B x (1 + K), the positive at index 0),   loss = CE(logits, 0)

then the step's keys overwrite the K-queue at its pointer, which advances by the number of keys
mod K: a FIFO of the last K keys. The queue and pointer live in `state.method_state`, so they are
replicated, checkpointed and restored with the rest of the state.

v1: linear 128-d head, tau 0.07, lr steps; v2: MLP head, tau 0.2, cosine lr, stronger
augmentation. `symmetric` (v2 option, as in the authors' CIFAR demo): both views serve as
queries, loss = ctr(q1, k2) + ctr(q2, k1), and both key sets are enqueued (view1's first).

BN: the query encoder normalises consecutive groups of `model.bn_group_size` samples (the
reference's per-GPU BN); the key encoder does the same on a randomly permuted batch, un-permuted
after (shuffling BN), so that a group's statistics cannot leak which key matches which query.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from mocojax import models
from mocojax import validate
from mocojax.methods import base
from mocojax.models import heads, norm


class Encoder(nn.Module):
  """ResNet with its classifier replaced by the v1/v2 head; returns (features, embedding)."""
  backbone: nn.Module
  head: nn.Module

  def __call__(self, images, train: bool = True):
    features = self.backbone(images, train=train)
    return features, self.head(features, train=train)


def init_queue(rng, size: int, dim: int):
  """As the reference: standard normal keys, each L2-normalised."""
  return base.l2_normalize(jax.random.normal(rng, (size, dim), jnp.float32))


def queue_logits(q, k, queue, temperature):
  """[q . k+, q . queue^T] / tau for L2-normalised q, k [B, D] and queue [K, D]."""
  positive = jnp.sum(q * k, axis=-1, keepdims=True)
  negatives = q @ queue.T
  return jnp.concatenate([positive, negatives], axis=1) / temperature


def instance_loss(logits):
  """Cross-entropy with the positive (index 0) as the label, mean over the batch."""
  return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - logits[:, 0])


def instance_accuracy(logits, ks=(1, 5)) -> dict:
  """Fraction of queries whose positive ranks within the top k of the (1 + K) logits."""
  # Rank = how many negatives score strictly higher than the positive.
  rank = jnp.sum(logits[:, 1:] > logits[:, :1], axis=-1)
  return {f'instance_acc/top{k}': jnp.mean(rank < k) for k in ks}


def enqueue(queue, ptr, keys):
  """Writes keys [n, D] at ptr and advances ptr by n mod K. K must be a multiple of n."""
  size, n = queue.shape[0], keys.shape[0]
  if size % n:
    raise ValueError(f'queue_size={size} is not a multiple of the {n} keys enqueued per step.')
  # A multiple of n never straddles the end, so one slice write is a FIFO with wrap-around.
  queue = jax.lax.dynamic_update_slice(queue, keys.astype(queue.dtype), (ptr, 0))
  return queue, (ptr + n) % size


def keys_per_step(config) -> int:
  return config.batch_size * (2 if config.symmetric else 1)


class MoCoV1V2:
  """Builds the query/key encoders from the config and computes the queue loss."""

  has_momentum_encoder = True
  # The v1/v2 linear probe: SGD at lr 30 for 100 epochs, lr x 0.1 at 60 and 80.
  probe_recipe = dict(base_lr=30.0, epochs=100.0, schedule='steps')
  # Sub-trees of the base parameters that the key encoder averages: all of them.
  momentum_keys = ('backbone', 'head')

  @staticmethod
  def config_problems(config) -> list:
    """queue_size and BN groups against the batch: a clear error before anything compiles."""
    # The rules' wording lives with every other config check, in validate.py.
    return validate.queue_problems(config) + validate.bn_group_problems(config)

  def __init__(self, config, dtype=jnp.float32):
    self.encoder = Encoder(
        backbone=models.build_backbone(config.model, dtype),
        head=heads.QueueHead(config.head.out_dim, mlp=config.head.mlp, dtype=dtype))
    self.temperature = config.temperature
    self.queue_size = config.queue_size
    self.out_dim = config.head.out_dim
    self.symmetric = config.symmetric
    self.shuffle_bn = config.shuffle_bn

  def init(self, rng, images):
    """Both encoders' variables (the key encoder a copy of the query one) and a random queue."""
    enc_rng, queue_rng = jax.random.split(rng)
    method_state = dict(queue=init_queue(queue_rng, self.queue_size, self.out_dim),
                        ptr=jnp.zeros((), jnp.int32))
    return base.with_momentum_copy(self.encoder.init(enc_rng, images, train=True),
                                   self.momentum_keys, method_state)

  def _apply(self, params, batch_stats, images):
    (features, z), batch_stats = base.apply_train(self.encoder, params, batch_stats, images)
    return features, base.l2_normalize(z.astype(jnp.float32)), batch_stats

  def query(self, params, batch_stats, images):
    """(backbone features, normalised queries, new BN stats); BN groups in batch order."""
    return self._apply(params, batch_stats, images)

  def keys(self, momentum_params, batch_stats, images, rng):
    """(normalised keys in input order, new BN stats), under shuffling BN if configured."""
    unshuffle = lambda y: y
    if self.shuffle_bn:
      images, unshuffle = norm.shuffle(rng, images)
    _, k, batch_stats = self._apply(momentum_params, batch_stats, images)
    return jax.lax.stop_gradient(unshuffle(k)), jax.lax.stop_gradient(batch_stats)

  def loss(self, params, state: base.StepState, momentum_params, batch, rng):
    """Loss of one step against the queue; aux carries the queue with this step's keys in.

    Returns (loss, aux), aux a base.Aux. BN running statistics thread through the calls in the
    reference's order.
    """
    x1, x2 = batch['view1'], batch['view2']
    queue, ptr = state.method_state['queue'], state.method_state['ptr']
    rng1, rng2 = jax.random.split(rng)
    bs, mbs = state.batch_stats, state.momentum_batch_stats

    f1, q1, bs = self.query(params, bs, x1)
    k2, mbs = self.keys(momentum_params, mbs, x2, rng2)
    logits = queue_logits(q1, k2, queue, self.temperature)
    loss, new_keys = instance_loss(logits), k2
    if self.symmetric:
      _, q2, bs = self.query(params, bs, x2)
      k1, mbs = self.keys(momentum_params, mbs, x1, rng1)
      logits21 = queue_logits(q2, k1, queue, self.temperature)
      loss = loss + instance_loss(logits21)
      logits, new_keys = jnp.concatenate([logits, logits21]), jnp.concatenate([k1, k2])

    queue, ptr = enqueue(queue, ptr, new_keys)
    return loss, base.Aux(batch_stats=bs, momentum_batch_stats=mbs,
                          method_state=dict(queue=queue, ptr=ptr),
                          metrics=instance_accuracy(jax.lax.stop_gradient(logits)),
                          features=jax.lax.stop_gradient(f1))

  def features(self, variables, images):
    """Backbone features of the query encoder in inference mode (kNN, linear probe, export)."""
    return base.backbone_features(self.encoder, variables, images)
