"""Projector and predictor MLPs of MoCo v3, and the v1/v2 heads.

The v3 MLP: Linear without bias; every hidden layer Linear -> BN -> ReLU; the last Linear
followed, optionally, by a BN without scale and bias. ViT projector: 3 layers, predictor: 2
layers, both with the last BN; ResNet projector: 2 layers with it, predictor 2 layers without.
The v1/v2 head (QueueHead) replaces the ResNet's fc: one Linear (v1) or Linear-ReLU-Linear
(v2), with biases and no BN.

BatchNorm statistics come from the batch the head is called on. Under `jax.jit` with the batch
sharded over the mesh, a mean over the batch axis is a mean over the *global* batch (XLA adds
the all-reduce), which is the SyncBatchNorm of the reference. The two views must be separate
calls so that each view is normalised with its own statistics.
"""

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mocojax.models import norm

# PyTorch's default nn.Linear init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)): the reference heads
# are built after the backbone's init runs, so they keep it.
torch_linear_init = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')

BN_MOMENTUM = norm.MOMENTUM
BN_EPS = norm.EPS


def torch_bias_init(fan_in: int):
  """PyTorch's default nn.Linear bias init, U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def batch_norm(train: bool, name: str, affine: bool = True, dtype: Any = jnp.float32):
  # The v3 heads always normalise over the global batch (SyncBatchNorm in the reference).
  return norm.BatchNorm(use_running_average=not train, stats='global', affine=affine,
                        dtype=dtype, name=name)


class MLP(nn.Module):
  """num_layers Linear layers (no bias); hidden ones with BN+ReLU; last optionally with BN."""
  num_layers: int
  hidden_dim: int
  out_dim: int
  last_bn: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    for i in range(self.num_layers):
      last = i == self.num_layers - 1
      x = nn.Dense(self.out_dim if last else self.hidden_dim, use_bias=False,
                   kernel_init=torch_linear_init, dtype=self.dtype, name=f'linear_{i}')(x)
      if not last:
        x = nn.relu(batch_norm(train, f'bn_{i}', dtype=self.dtype)(x))
      elif self.last_bn:
        x = batch_norm(train, f'bn_{i}', affine=False, dtype=self.dtype)(x)
    return x


class QueueHead(nn.Module):
  """The v1/v2 head that replaces the ResNet's classifier `fc` (Linear layers with bias).

  v1: fc, Linear(D, out). v2 (mlp=True): fc_0 Linear(D, D) -> ReLU -> fc_2 Linear(D, out), no
  BN. The names are torchvision's fc / fc.0 / fc.2 of the reference's `encoder.fc`.
  """
  out_dim: int = 128
  mlp: bool = False
  dtype: Any = jnp.float32

  def _linear(self, features, fan_in, name):
    return nn.Dense(features, kernel_init=torch_linear_init, bias_init=torch_bias_init(fan_in),
                    dtype=self.dtype, name=name)

  @nn.compact
  def __call__(self, x, train: bool = True):
    del train  # no BN in the v1/v2 heads
    d = x.shape[-1]
    if not self.mlp:
      return self._linear(self.out_dim, d, 'fc')(x)
    x = nn.relu(self._linear(d, d, 'fc_0')(x))
    return self._linear(self.out_dim, d, 'fc_2')(x)
