"""tf.data pipelines for MoCo pretraining and evaluation, and device feeding.

The training stream is a pure function of (seed, step): the example indices of
step s come from a stateless shuffle of the split keyed by (seed, epoch), and
the augmentation of each example from uniforms drawn for the whole global
batch from a key of (seed, s), i.e. keyed by (seed, s, row in the global
batch, view). Resuming at any step therefore reproduces the uninterrupted
stream bit for bit (same machine and TF build) without checkpointing iterator
state. The global batch holds the same examples and random draws whatever the
number of hosts.

The work is split where it is cheapest: the host reads, decodes and crops
(uint8 out, a quarter of float32's bytes to the device); the device does the
photometric rest (`photometric`), keyed by each example's (seed, step, row).
"""

from __future__ import annotations

import atexit
import collections
import functools
import weakref
from typing import Iterator

import jax
import numpy as np
import tensorflow as tf

from mocojax.data import augment, photometric, recipes
from mocojax.data.sources import Source

# Distinct streams derived from the user seed, so that shuffling and
# augmentation never reuse the same random numbers.
_SHUFFLE_STREAM = 0
_AUGMENT_STREAM = 1
LABELLED_STREAM = 2  # the crops of the probe's and fine-tuning's input (data/labelled.py)


def steps_per_epoch(source: Source, global_batch: int) -> int:
  """Whole global batches per epoch; the remainder is dropped."""
  steps = source.num_examples // global_batch
  if steps < 1:
    raise ValueError(
        f'global_batch={global_batch} exceeds the {source.num_examples} '
        f'examples of {source.name}.')
  return steps


def host_split(global_batch: int, process_index, process_count):
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
  pi, _, b = host_split(global_batch, process_index, process_count)
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
                  per_host: int, shape=(2, augment.CROP_UNIFORMS),
                  stream: int = _AUGMENT_STREAM):
  """This host's rows of the step's uniforms [b, *shape] (default: two
  views' crop uniforms) of the random stream `stream` of `seed`.

  Drawn for the whole global batch from a key of (seed, stream, step) and
  sliced, so row r's draws depend only on (seed, step, r), whatever the
  number of hosts.
  """
  key = _fold(_base_seed(seed), stream, step)
  u = tf.random.stateless_uniform([global_batch, *shape], key,
                                  dtype=tf.float32)
  return u[process_index * per_host:(process_index + 1) * per_host]


def train_dataset(source: Source, *, global_batch: int, seed: int,
                  start_step: int, image_size: int, recipe: str = 'mocov3',
                  crop_scale=None, process_index=None, process_count=None,
                  augment_overrides=None,
                  num_parallel_calls=tf.data.AUTOTUNE) -> tf.data.Dataset:
  """The host half of the two-view stream: endless per-host batches from start_step of
  {'view1', 'view2': uint8 [b, S, S, C] random resized crops, 'label',
   'step', 'row': int32 [b], each example's global step and row in the global batch}.

  Element k is global step start_step + k, b = global_batch // process_count.
  `photometric.two_views` on the device finishes the views (jitter, grayscale, blur, solarize,
  flip, normalisation), keyed by 'step' and 'row'; `train_batches` runs both halves.
  `augment_overrides` replaces recipe ViewSpec fields of both views.

  Sources with `batched_lookup` (in-memory arrays) are gathered and cropped a
  whole step at a time; others (image files) are read, decoded once and
  cropped twice per example.
  """
  pi, pc, b = host_split(global_batch, process_index, process_count)
  if start_step < 0:
    raise ValueError(f'start_step={start_step} must be >= 0.')
  specs = recipes.view_specs(recipe, crop_scale, **(augment_overrides or {}))
  steps = train_steps(source, global_batch=global_batch, seed=seed,
                      start_step=start_step, process_index=pi,
                      process_count=pc)
  rows = tf.range(pi * b, (pi + 1) * b, dtype=tf.int32)

  def crop_args(v):
    return dict(size=image_size, scale=specs[v].crop_scale,
                ratio=specs[v].crop_ratio)

  if source.batched_lookup:
    def load_step(step, indices):
      example = source.lookup(indices)
      u = step_uniforms(seed, step, global_batch, pi, b)
      views = {f'view{v + 1}': augment.random_resized_crop_batch(
          example['image'], u[:, v], **crop_args(v)) for v in range(2)}
      return dict(views, label=tf.cast(example['label'], tf.int32),
                  step=tf.fill([b], tf.cast(step, tf.int32)), row=rows)

    ds = steps.map(load_step, num_parallel_calls=num_parallel_calls,
                   deterministic=True)
  else:
    def explode(step, indices):
      return tf.data.Dataset.from_tensor_slices(
          (tf.fill([b], tf.cast(step, tf.int32)), rows, indices,
           step_uniforms(seed, step, global_batch, pi, b)))

    def load_example(step, row, index, u):
      example = source.fetch(index)  # one read and one decode for both views
      views = augment.random_resized_crops(
          example['image'], u, image_size,
          [s.crop_scale for s in specs], [s.crop_ratio for s in specs],
          channels=source.image_shape[-1])
      return dict(view1=views[0], view2=views[1],
                  label=tf.cast(example['label'], tf.int32), step=step,
                  row=row)

    ds = steps.flat_map(explode)
    ds = ds.map(load_example, num_parallel_calls=num_parallel_calls,
                deterministic=True)
    ds = ds.batch(b, drop_remainder=True)
  return ds.prefetch(tf.data.AUTOTUNE)


def train_batches(source: Source, *, sharding, global_batch: int, seed: int,
                  start_step: int, image_size: int, mean, std,
                  recipe: str = 'mocov3', crop_scale=None,
                  augment_overrides=None, **host_kw) -> Iterator[dict]:
  """Global device batches {'view1', 'view2' float32 normalised, 'label'} from start_step:
  `train_dataset` on this host, then `photometric.two_views` on the devices. A pure function
  of (seed, step), like each half."""
  overrides = augment_overrides or {}
  ds = train_dataset(source, global_batch=global_batch, seed=seed,
                     start_step=start_step, image_size=image_size,
                     recipe=recipe, crop_scale=crop_scale,
                     augment_overrides=overrides, **host_kw)
  specs = recipes.view_specs(recipe, crop_scale, **overrides)
  finish = functools.partial(photometric.two_views, specs=specs, seed=seed,
                             mean=tuple(mean), std=tuple(std))
  return device_batches(ds, sharding, finish)


def eval_preprocess(image, image_size: int, channels=None):
  """Resize the shorter side to round(S * 256 / 224), centre-crop S; uint8 out.

  The ImageNet 256 -> 224 protocol scaled to S; images already S x S are
  passed through untouched (e.g. 28 px Fashion-MNIST at S = 28). Takes one
  [H, W, C] image, a [B, H, W, C] batch, or one encoded image (`Source.fetch`, decoded to
  `channels` as PIL decodes it). Normalisation happens on the device (`eval_batches`).
  """
  if image.dtype != tf.string and tuple(image.shape[-3:-1]) == (image_size, image_size):
    return image
  x = augment.resize_shorter(image, round(image_size * 256 / 224), channels)
  return augment.center_crop(x, image_size)


def eval_dataset(source: Source, *, global_batch: int, image_size: int,
                 process_index=None, process_count=None,
                 num_parallel_calls=tf.data.AUTOTUNE) -> tf.data.Dataset:
  """One finite pass, {'image' uint8, 'label', 'mask'}, padded to whole global batches.

  Global batch g holds examples [g*B, (g+1)*B); this host gets rows
  [pi*b, (pi+1)*b) of it. Rows past the end repeat example 0 with
  mask=False, so over all hosts each example has mask=True exactly once and
  every host runs the same number of steps.
  """
  pi, _, b = host_split(global_batch, process_index, process_count)
  n = source.num_examples
  num_batches = -(-n // global_batch)

  def host_rows(g):
    return g * global_batch + pi * b + tf.range(b, dtype=tf.int64)

  def load(i):  # one index, or a vector of them with batched lookup
    valid = i < n
    i = tf.where(valid, i, 0)
    example = source.lookup(i) if source.batched_lookup else source.fetch(i)
    return {'image': eval_preprocess(example['image'], image_size, source.image_shape[-1]),
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


def eval_batches(source: Source, *, sharding, global_batch: int,
                 image_size: int, mean, std, num_batches=None,
                 **host_kw) -> Iterator[dict]:
  """Global device batches {'image' float32 normalised, 'label', 'mask'}: `eval_dataset`
  (optionally its first `num_batches`), normalised on the devices."""
  ds = eval_dataset(source, global_batch=global_batch, image_size=image_size,
                    **host_kw)
  if num_batches is not None:
    ds = ds.take(num_batches)
  return device_batches(ds, sharding, functools.partial(
      photometric.images, mean=tuple(mean), std=tuple(std)))


# device_batches generators not yet closed. tf.data's threads call back into Python (the host
# crops are PIL calls), and a thread that needs the GIL once the interpreter has begun to
# finalize blocks for ever, so a process leaving a pipeline open at exit (an uncaught
# exception, a loop at module level) would hang instead of exiting. Closing them at exit, while
# Python still runs, frees their tf.data iterators first.
_OPEN = weakref.WeakSet()


@atexit.register
def _close_open_pipelines():
  for batches in list(_OPEN):
    batches.close()


def device_batches(dataset, sharding, transform=None,
                   prefetch: int = 2) -> Iterator[dict]:
  """Yields global jax.Arrays built from this host's batches.

  `sharding` is one sharding for every leaf (typically a NamedSharding that
  splits the leading batch axis) or a pytree of shardings matching the
  batch. `transform` (a jax function of a batch, such as
  `photometric.two_views`) then runs on the devices, each on its own rows
  (so it must treat rows independently) with a single NamedSharding. Up to
  `prefetch` batches are transferred and transformed ahead, so the
  host-to-device copy and the device work of the next batch overlap the
  current step.
  """
  def to_global(batch):
    if isinstance(sharding, jax.sharding.Sharding):
      return jax.tree.map(
          lambda x: jax.make_array_from_process_local_data(sharding, x),
          batch)
    return jax.tree.map(jax.make_array_from_process_local_data, sharding,
                        batch)

  place = to_global
  if transform is not None:
    on_devices = photometric.per_shard(transform, sharding)
    place = lambda batch: on_devices(to_global(batch))

  def batches():
    queue = collections.deque()
    for batch in dataset.as_numpy_iterator() if isinstance(
        dataset, tf.data.Dataset) else dataset:
      queue.append(place(batch))
      if len(queue) > prefetch:
        yield queue.popleft()
    while queue:
      yield queue.popleft()

  generator = batches()
  _OPEN.add(generator)
  return generator
