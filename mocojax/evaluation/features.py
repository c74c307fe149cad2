"""Feature extraction that keeps the features on device, row-sharded over the 'data' mesh axis."""
import functools

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXIS = 'data'


@functools.partial(jax.jit, static_argnames='sharding')
def _concat_rows(parts, sharding):
  # Constrained (not left to propagation) so the result is row-sharded whatever XLA would prefer;
  # the static sharding keeps one cache entry per (mesh, number of batches).
  return jax.lax.with_sharding_constraint(jnp.concatenate(parts), sharding)


def extract_features(feature_fn, variables, batches, *, mesh: Mesh):
  """Runs `feature_fn(variables, images) -> [B, D]` over `batches`; returns (features, labels, mask).

  `batches` yields dicts {'image', 'label', 'mask'} of global arrays sharded over 'data', padded to
  whole global batches (mask False on padding). The outputs keep that padding and stay sharded over
  'data' in batch order, so nothing is gathered to a host; pass `mask` on as the kNN bank/query mask.
  """
  rows = NamedSharding(mesh, P(AXIS))
  # Inputs are already placed, so jit follows their shardings; only the output layout is pinned.
  apply = jax.jit(feature_fn, out_shardings=rows)
  features, labels, masks = [], [], []
  for batch in batches:
    features.append(apply(variables, batch['image']))
    labels.append(batch['label'])
    masks.append(batch['mask'])
  if not features:
    raise ValueError('no batches to extract features from')
  # Wait for every batch before the first program that moves rows between devices. The batches
  # are hundreds of programs without collectives, so one device can fall 32 programs behind (XLA
  # CPU's per-device limit on programs in flight). Its next launch then blocks a thread of the
  # client's pool (max(cores, devices) threads: 8 for 8 virtual devices on 2 cores) while the
  # other devices hold the rest of the pool waiting in the collective for it: the pool is
  # exhausted, the late device's pending work never runs, and the process hangs at 0% CPU. Free
  # on accelerators, where the kNN needs every feature anyway.
  jax.block_until_ready((features, labels, masks))
  return (_concat_rows(features, rows), _concat_rows(labels, rows), _concat_rows(masks, rows))


def split_features(feature_fn, variables, source, *, data_config, batch_size: int, mesh: Mesh):
  """(features, labels, mask) of every example of `source`: resize + centre crop, no
  augmentation, normalised as `data_config` says; row-sharded and padded as above."""
  from mocojax import parallel  # the data pipeline (TensorFlow) only where features are made
  from mocojax.data import pipeline
  d = data_config
  batches = pipeline.eval_batches(source, sharding=parallel.batch_sharding(mesh),
                                  global_batch=batch_size, image_size=d.image_size,
                                  mean=d.mean, std=d.std)
  return extract_features(feature_fn, variables, batches, mesh=mesh)
