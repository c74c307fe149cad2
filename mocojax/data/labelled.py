"""Labelled training input of the linear probe and fine-tuning.

RandomResizedCrop + horizontal flip (the MoCo linear-classification transform), a pure function
of (seed, step) as the pretraining stream is: the same shuffled steps (`pipeline.train_steps`),
the same host split, and uniforms of the same kind, from a stream of their own
(`pipeline.LABELLED_STREAM`), so a probe with the pretraining seed does not replay the
pretraining crops. Evaluation images use `pipeline.eval_batches` (resize, centre crop).
"""

import functools

import tensorflow as tf

from mocojax.data import augment, photometric, pipeline
from mocojax.data.sources import Source

_FLIP = augment.CROP_UNIFORMS  # column of the flip uniform, after the crop's
_UNIFORMS = augment.CROP_UNIFORMS + 1


def train_dataset(source: Source, *, global_batch: int, seed: int, start_step: int = 0,
                  image_size: int, crop_scale=(0.08, 1.0), process_index=None,
                  process_count=None,
                  num_parallel_calls=tf.data.AUTOTUNE) -> tf.data.Dataset:
  """Endless per-host batches {'image' [b, S, S, C] uint8, 'label' [b] int32}: random resized
  crop and flip, on the host (normalisation is left to the device: `train_batches`)."""
  pi, pc, b = pipeline.host_split(global_batch, process_index, process_count)
  crop_scale = tuple(crop_scale)
  steps = pipeline.train_steps(source, global_batch=global_batch, seed=seed,
                               start_step=start_step, process_index=pi, process_count=pc)
  uniforms = functools.partial(pipeline.step_uniforms, seed, global_batch=global_batch,
                               process_index=pi, per_host=b, shape=(_UNIFORMS,),
                               stream=pipeline.LABELLED_STREAM)

  def flip(images, u):  # [..., H, W, C] with u [...]: mirror where u < 1/2
    mirrored = tf.reverse(images, axis=[-2])
    return tf.where(tf.reshape(u < 0.5, tf.concat([tf.shape(u), [1, 1, 1]], 0)), mirrored,
                    images)

  if source.batched_lookup:
    # Same-size in-memory images: gather and crop a whole step at once.
    def load_step(step, indices):
      example = source.lookup(indices)
      u = uniforms(step)
      crops = augment.random_resized_crop_batch(example['image'], u[:, :_FLIP], image_size,
                                                crop_scale)
      return {'image': flip(crops, u[:, _FLIP]), 'label': tf.cast(example['label'], tf.int32)}

    ds = steps.map(load_step, num_parallel_calls=num_parallel_calls, deterministic=True)
  else:
    # Images of any size (files): crop each on its own.
    def explode(step, indices):
      return tf.data.Dataset.from_tensor_slices((indices, uniforms(step)))

    def load_example(index, u):
      example = source.fetch(index)
      crop = augment.random_resized_crop(example['image'], u[:_FLIP], image_size, crop_scale,
                                         channels=source.image_shape[-1])
      return {'image': flip(crop, u[_FLIP]), 'label': tf.cast(example['label'], tf.int32)}

    ds = steps.flat_map(explode)
    ds = ds.map(load_example, num_parallel_calls=num_parallel_calls, deterministic=True)
    ds = ds.batch(b, drop_remainder=True)
  return ds.prefetch(tf.data.AUTOTUNE)


def train_batches(source: Source, *, sharding, mean, std, **kw):
  """`train_dataset` as global device batches with the image normalised on the devices."""
  return pipeline.device_batches(train_dataset(source, **kw), sharding, functools.partial(
      photometric.images, mean=tuple(mean), std=tuple(std)))
