"""Supervised pieces shared by the linear probe and fine-tuning.

  train_batches    labelled training batches: RandomResizedCrop + horizontal flip (the MoCo
                   linear-classification transform), a pure function of (seed, step) like the
                   pretraining stream, on the same index stream (`pipeline.train_steps`);
  LinearHeads      K independent Linear classifiers over the same features, optionally behind
                   a parameter-free BatchNorm (MAE's linear probe), so a learning-rate sweep
                   costs one backbone pass;
  cross_entropy    with label smoothing;
  count_correct    masked top-1 counts per head, for the padded evaluation batches.

Evaluation images use `pipeline.eval_batches` (resize to S*256/224, centre crop S).
"""

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import tensorflow as tf

from mocojax.data import augment, photometric, pipeline
from mocojax.data.sources import Source

# Augmentation uniforms of the labelled stream: a seed stream of its own, so a probe with the
# pretraining seed does not replay the pretraining crops.
_STREAM = 0x6C696E  # 'lin'
_FLIP = augment.CROP_UNIFORMS  # column of the flip uniform, after the crop's
_UNIFORMS = augment.CROP_UNIFORMS + 1


def _step_uniforms(seed: int, step, global_batch: int, process_index: int, per_host: int):
  key = tf.constant([seed & 0x7FFFFFFF, _STREAM], tf.int64)
  key = tf.random.experimental.stateless_fold_in(key, tf.cast(step % (1 << 31), tf.int32))
  u = tf.random.stateless_uniform([global_batch, _UNIFORMS], key, dtype=tf.float32)
  # Drawn for the whole global batch and sliced: row r's crop depends on (seed, step, r) only.
  return u[process_index * per_host:(process_index + 1) * per_host]


def train_dataset(source: Source, *, global_batch: int, seed: int, start_step: int = 0,
                  image_size: int, crop_scale=(0.08, 1.0), process_index=None,
                  process_count=None,
                  num_parallel_calls=tf.data.AUTOTUNE) -> tf.data.Dataset:
  """Endless per-host batches {'image' [b, S, S, C] uint8, 'label' [b] int32}: random resized
  crop and flip, on the host (normalisation is left to the device: `train_batches`)."""
  pi = jax.process_index() if process_index is None else process_index
  pc = jax.process_count() if process_count is None else process_count
  if global_batch % pc:
    raise ValueError(f'global_batch={global_batch} is not divisible by {pc} processes.')
  b = global_batch // pc
  crop_scale = tuple(crop_scale)
  steps = pipeline.train_steps(source, global_batch=global_batch, seed=seed,
                               start_step=start_step, process_index=pi, process_count=pc)

  def flip(images, u):  # [..., H, W, C] with u [...]: mirror where u < 1/2
    mirrored = tf.reverse(images, axis=[-2])
    return tf.where(tf.reshape(u < 0.5, tf.concat([tf.shape(u), [1, 1, 1]], 0)), mirrored,
                    images)

  if source.batched_lookup:
    # Same-size in-memory images: gather and crop a whole step at once.
    def load_step(step, indices):
      example = source.lookup(indices)
      u = _step_uniforms(seed, step, global_batch, pi, b)
      crops = augment.random_resized_crop_batch(example['image'], u[:, :_FLIP], image_size,
                                                crop_scale)
      return {'image': flip(crops, u[:, _FLIP]), 'label': tf.cast(example['label'], tf.int32)}

    ds = steps.map(load_step, num_parallel_calls=num_parallel_calls, deterministic=True)
  else:
    # Images of any size (files): crop each on its own.
    def explode(step, indices):
      u = _step_uniforms(seed, step, global_batch, pi, b)
      return tf.data.Dataset.from_tensor_slices((indices, u))

    def load_example(index, u):
      example = source.lookup(index)
      crop = augment.random_resized_crop(example['image'], u[:_FLIP], image_size, crop_scale)
      return {'image': flip(crop, u[_FLIP]), 'label': tf.cast(example['label'], tf.int32)}

    ds = steps.flat_map(explode)
    ds = ds.map(load_example, num_parallel_calls=num_parallel_calls, deterministic=True)
    ds = ds.batch(b, drop_remainder=True)
  return ds.prefetch(tf.data.AUTOTUNE)


def train_batches(source: Source, *, sharding, mean, std, **kw):
  """`train_dataset` as global device batches with the image normalised on the devices."""
  return pipeline.device_batches(train_dataset(source, **kw), sharding, functools.partial(
      photometric.images, mean=tuple(mean), std=tuple(std)))


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
