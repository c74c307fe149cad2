"""Batch norm whose training statistics come from the global batch or from groups of it.

MoCo's recipes differ in *which samples* a BN layer normalises together:

  'global'  the whole global batch (v3's SyncBatchNorm). Under `jax.jit` with the batch sharded
            over the mesh a mean over the batch axis is already global: XLA adds the all-reduce.
  'group'   consecutive groups of `group_size` samples, each normalised on its own: the
            per-GPU BN of v1/v2, whose GPUs each saw 32 images. The group size is a property
            of the recipe, not of the hardware, so one config gives the same loss on 1 or 8
            devices (and on 8 devices each group of a 256-batch lies on one device).

Shuffling BN (v1/v2's key encoder) is group BN on a randomly permuted batch: `shuffle` permutes
the batch and returns the inverse, so the caller runs permute -> encoder -> un-permute. That is
what the reference's gather / shuffle / scatter across GPUs amounts to: each GPU's BN group is
a random subset of the global batch, and the keys come back in their original order.

Running statistics (for inference) are the mean over groups of the per-group mean and unbiased
variance (x n/(n-1), n the values per channel in a group), updated with PyTorch's momentum 0.1.
That is what PyTorch's BatchNorm, and so every reference MoCo, stores; flax's BatchNorm keeps
the biased variance, which would shift inference-mode features (kNN, probes, export) by
n/(n-1): 3% for a v1/v2 projector BN over a group of 32. Training-mode normalisation uses the
biased variance, as both do.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

STATS = ('global', 'group')
MOMENTUM = 0.9    # flax convention: running = 0.9 * running + 0.1 * batch (PyTorch momentum 0.1)
EPS = 1e-5        # PyTorch's default


def num_groups(batch: int, stats: str, group_size: int) -> int:
  """How many independently normalised groups a batch of `batch` samples splits into."""
  if stats == 'global':
    return 1
  if stats != 'group':
    raise ValueError(f'BN statistics {stats!r} are unknown; use one of {STATS}.')
  if batch % group_size:
    raise ValueError(f'A batch of {batch} samples does not split into BN groups of '
                     f'bn_group_size={group_size}; make the batch size a multiple of it.')
  return batch // group_size


class BatchNorm(nn.Module):
  """BN over the batch (and spatial) axes; features on the last axis.

  Same variable names as flax's nn.BatchNorm (params scale/bias, batch_stats mean/var), so a
  'global' layer is a drop-in replacement and names map onto PyTorch's weight/bias/running_*.
  """
  use_running_average: bool = False
  stats: str = 'global'
  group_size: int = 32
  momentum: float = MOMENTUM
  epsilon: float = EPS
  affine: bool = True
  scale_init: Any = nn.initializers.ones
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    ra_mean = self.variable('batch_stats', 'mean', jnp.zeros, (c,), jnp.float32)
    ra_var = self.variable('batch_stats', 'var', jnp.ones, (c,), jnp.float32)
    xf = x.astype(jnp.float32)
    if self.use_running_average:
      y = (xf - ra_mean.value) * jax.lax.rsqrt(ra_var.value + self.epsilon)
    else:
      # init runs on a single sample, which no group size divides: normalise it as one group.
      groups = 1 if self.is_initializing() else num_groups(x.shape[0], self.stats, self.group_size)
      xg = xf.reshape((groups, x.shape[0] // groups) + x.shape[1:])
      axes = tuple(range(1, xg.ndim - 1))  # every axis but groups and features
      mean = jnp.mean(xg, axes, keepdims=True)
      var = jnp.mean(jnp.square(xg - mean), axes, keepdims=True)  # two-pass: no cancellation
      y = ((xg - mean) * jax.lax.rsqrt(var + self.epsilon)).reshape(x.shape)
      if not self.is_initializing():
        m = self.momentum
        ra_mean.value = m * ra_mean.value + (1 - m) * jnp.mean(mean.reshape(groups, c), 0)
        n = xg.size // (groups * c)  # values per channel in one group
        unbiased = var.reshape(groups, c) * (n / max(n - 1, 1))
        ra_var.value = m * ra_var.value + (1 - m) * jnp.mean(unbiased, 0)
    if self.affine:
      y = y * self.param('scale', self.scale_init, (c,), jnp.float32)
      y = y + self.param('bias', nn.initializers.zeros, (c,), jnp.float32)
    return y.astype(self.dtype)


def shuffle(rng, x):
  """(x permuted along the batch axis by a fresh random permutation, the inverse function).

  unshuffle(f(x_shuffled)) puts each output row back at the row of its input sample.
  """
  perm = jax.random.permutation(rng, x.shape[0])
  inverse = jnp.argsort(perm)
  return x[perm], lambda y: y[inverse]
