"""tf.data pipelines for MoCo pretraining and evaluation, and device feeding.

The training stream is a pure function of (seed, step): the example indices of
step s come from a stateless shuffle of the split keyed by (seed, epoch), and
the augmentation of each example from uniforms drawn for the whole global
batch from a key of (seed, s), i.e. keyed by (seed, s, row in the global
batch, view). Resuming at any step therefore reproduces the uninterrupted
stream bit for bit (same machine and TF build) without checkpointing iterator
state. The global batch holds the same examples and random draws whatever the
number of hosts; its pixel values agree to float rounding only, because
vectorised kernels round differently at different per-host batch sizes.
"""

from __future__ import annotations

import collections
from typing import Iterator

import jax
import numpy as np
import tensorflow as tf

from mocojax.data import augment
from mocojax.data.sources import Source

# Distinct streams derived from the user seed, so that shuffling and
# augmentation never reuse the same random numbers.
_SHUFFLE_STREAM = 0
_AUGMENT_STREAM = 1


def steps_per_epoch(source: Source, global_batch: int) -> int:
  """Whole global batches per epoch; the remainder is dropped."""
  steps = source.num_examples // global_batch
  if steps < 1:
    raise ValueError(
        f'global_batch={global_batch} exceeds the {source.num_examples} '
        f'examples of {source.name}.')
  return steps


def _host_split(global_batch: int, process_index, process_count):
  if process_index is None:
    process_index = jax.process_index()
  if process_count is None:
    process_count = jax.process_count()
  if not 0 <= process_index < process_count:
    raise ValueError(
        f'process_index={process_index} not in [0, {process_count}).')
  if global_batch % process_count:
    raise ValueError(
        f'global_batch={global_batch} is not divisible by process_count='
        f'{process_count}; every host must get the same per-host batch.')
  return process_index, process_count, global_batch // process_count


def _fold(seed, *data):
  """Folds int64 scalars into a [2] seed (both 32-bit halves, to be safe)."""
  for d in data:
    d = tf.cast(d, tf.int64)
    seed = tf.random.experimental.stateless_fold_in(
        seed, tf.cast(d % (1 << 31), tf.int32))
    seed = tf.random.experimental.stateless_fold_in(
        seed, tf.cast(d // (1 << 31), tf.int32))
  return seed


def _base_seed(seed: int):
  return tf.constant([seed & 0x7FFFFFFF, (seed >> 31) & 0x7FFFFFFF],
                     tf.int64)


def epoch_permutation(num_examples: int, seed: int, epoch):
  """The shuffled order of the split for `epoch` (stateless)."""
  key = _fold(_base_seed(seed), _SHUFFLE_STREAM, epoch)
  return tf.random.experimental.stateless_shuffle(
      tf.range(num_examples, dtype=tf.int64), key)


def train_steps(source: Source, *, global_batch: int, seed: int,
                start_step: int = 0, process_index=None,
                process_count=None) -> tf.data.Dataset:
  """(step, this host's example indices [b]) for every step from start_step.

  Each epoch's permutation is computed once (not once per step) and split
  into steps; only the first epoch is entered mid-way.
  """
  pi, _, b = _host_split(global_batch, process_index, process_count)
  spe = steps_per_epoch(source, global_batch)
  start_epoch = start_step // spe

  def epoch_steps(epoch):
    perm = epoch_permutation(source.num_examples, seed, epoch)
    rows = tf.reshape(perm[:spe * global_batch], [spe, global_batch])
    steps = epoch * spe + tf.range(spe, dtype=tf.int64)
    first = tf.where(epoch == start_epoch, start_step - start_epoch * spe, 0)
    return tf.data.Dataset.from_tensor_slices(
        (steps[first:], rows[first:, pi * b:(pi + 1) * b]))

  epochs = tf.data.Dataset.range(start_epoch, np.iinfo(np.int64).max)
  return epochs.flat_map(epoch_steps)


def step_uniforms(seed: int, step, global_batch: int, process_index: int,
                  per_host: int):
  """This host's rows of the step's augmentation uniforms [b, 2, K].

  Drawn for the whole global batch from a key of (seed, step) and sliced,
  so row r's randomness depends only on (seed, step, r, view), whatever the
  number of hosts.
  """
  key = _fold(_base_seed(seed), _AUGMENT_STREAM, step)
  u = tf.random.stateless_uniform([global_batch, 2, augment.VIEW_UNIFORMS],
                                  key, dtype=tf.float32)
  return u[process_index * per_host:(process_index + 1) * per_host]


def train_dataset(source: Source, *, global_batch: int, seed: int,
                  start_step: int, image_size: int, recipe: str = 'mocov3',
                  crop_scale=None, mean, std, process_index=None,
                  process_count=None, augment_overrides=None,
                  num_parallel_calls=tf.data.AUTOTUNE) -> tf.data.Dataset:
  """Endless per-host batches {'view1', 'view2', 'label'} from start_step.

  Element k is global step start_step + k; views are float32 [b, S, S, C]
  with b = global_batch // process_count. `augment_overrides` replaces
  ViewSpec fields of both views (see augment.view_specs).

  Sources with `batched_lookup` (in-memory arrays) are gathered and
  augmented a whole step at a time. Others (image files) are read and
  cropped per example, then the rest of the augmentation runs per batch.
  """
  pi, pc, b = _host_split(global_batch, process_index, process_count)
  if start_step < 0:
    raise ValueError(f'start_step={start_step} must be >= 0.')
  specs = augment.view_specs(recipe, crop_scale,
                             **(augment_overrides or {}))
  steps = train_steps(source, global_batch=global_batch, seed=seed,
                      start_step=start_step, process_index=pi,
                      process_count=pc)

  def uniforms(step):
    return step_uniforms(seed, step, global_batch, pi, b)

  def finish(crops, u, label):
    views = {
        f'view{v + 1}': augment.normalize(
            augment.finish_view_batch(crops[v], u[:, v], specs[v]), mean,
            std) for v in range(2)}
    return dict(views, label=tf.cast(label, tf.int32))

  if source.batched_lookup:
    def load_step(step, indices):
      example = source.lookup(indices)
      images = tf.image.convert_image_dtype(example['image'], tf.float32)
      u = uniforms(step)
      crops = [augment.crop_view_batch(images, u[:, v], specs[v], image_size)
               for v in range(2)]
      return finish(crops, u, example['label'])

    ds = steps.map(load_step, num_parallel_calls=num_parallel_calls,
                   deterministic=True)
  else:
    def explode(step, indices):
      return tf.data.Dataset.from_tensor_slices((indices, uniforms(step)))

    def load_example(index, u):
      example = source.lookup(index)
      image = tf.image.convert_image_dtype(example['image'], tf.float32)
      crops = tuple(augment.crop_view(image, u[v], specs[v], image_size)
                    for v in range(2))
      return crops, u, example['label']

    ds = steps.flat_map(explode)
    ds = ds.map(load_example, num_parallel_calls=num_parallel_calls,
                deterministic=True)
    ds = ds.batch(b, drop_remainder=True)
    ds = ds.map(finish, num_parallel_calls=num_parallel_calls,
                deterministic=True)
  return ds.prefetch(tf.data.AUTOTUNE)


def eval_preprocess(image, image_size: int, mean, std):
  """Resize the shorter side to round(S * 256 / 224), centre-crop S.

  The ImageNet 256 -> 224 protocol scaled to S; images already S x S are
  passed through untouched (e.g. 28 px Fashion-MNIST at S = 28). Takes one
  [H, W, C] image or a [B, H, W, C] batch.
  """
  x = tf.image.convert_image_dtype(image, tf.float32)
  if tuple(image.shape[-3:-1]) != (image_size, image_size):
    x = augment.resize_shorter(x, round(image_size * 256 / 224))
    x = augment.center_crop(x, image_size)
  return augment.normalize(x, mean, std)


def eval_dataset(source: Source, *, global_batch: int, image_size: int, mean,
                 std, process_index=None, process_count=None,
                 num_parallel_calls=tf.data.AUTOTUNE) -> tf.data.Dataset:
  """One finite pass, {'image', 'label', 'mask'}, padded to whole global batches.

  Global batch g holds examples [g*B, (g+1)*B); this host gets rows
  [pi*b, (pi+1)*b) of it. Rows past the end repeat example 0 with
  mask=False, so over all hosts each example has mask=True exactly once and
  every host runs the same number of steps.
  """
  pi, _, b = _host_split(global_batch, process_index, process_count)
  n = source.num_examples
  num_batches = -(-n // global_batch)

  def host_rows(g):
    return g * global_batch + pi * b + tf.range(b, dtype=tf.int64)

  def load(i):  # one index, or a vector of them with batched lookup
    valid = i < n
    example = source.lookup(tf.where(valid, i, 0))
    return {'image': eval_preprocess(example['image'], image_size, mean, std),
            'label': tf.cast(example['label'], tf.int32),
            'mask': valid}

  batches = tf.data.Dataset.range(num_batches)
  if source.batched_lookup:
    ds = batches.map(host_rows).map(
        load, num_parallel_calls=num_parallel_calls, deterministic=True)
  else:
    ds = batches.flat_map(
        lambda g: tf.data.Dataset.from_tensor_slices(host_rows(g)))
    ds = ds.map(load, num_parallel_calls=num_parallel_calls,
                deterministic=True)
    ds = ds.batch(b, drop_remainder=True)
  return ds.prefetch(tf.data.AUTOTUNE)


def device_batches(dataset, sharding, prefetch: int = 2) -> Iterator[dict]:
  """Yields global jax.Arrays built from this host's batches.

  `sharding` is one sharding for every leaf (typically a NamedSharding that
  splits the leading batch axis) or a pytree of shardings matching the
  batch. Up to `prefetch` batches are transferred ahead, so the host-to-device
  copy of the next batch overlaps the current step.
  """
  def to_global(batch):
    if isinstance(sharding, jax.sharding.Sharding):
      return jax.tree.map(
          lambda x: jax.make_array_from_process_local_data(sharding, x),
          batch)
    return jax.tree.map(jax.make_array_from_process_local_data, sharding,
                        batch)

  queue = collections.deque()
  for batch in dataset.as_numpy_iterator() if isinstance(
      dataset, tf.data.Dataset) else dataset:
    queue.append(to_global(batch))
    if len(queue) > prefetch:
      yield queue.popleft()
  while queue:
    yield queue.popleft()
