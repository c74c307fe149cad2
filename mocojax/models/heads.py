"""Projector and predictor MLPs of MoCo v3, and the v1/v2 heads.

The v3 MLP: Linear without bias; every hidden layer Linear -> BN -> ReLU; the last Linear
followed, optionally, by a BN without scale and bias. ViT projector: 3 layers, predictor: 2
layers, both with the last BN; ResNet projector: 2 layers with it, predictor 2 layers without.

BatchNorm statistics come from the batch the head is called on. Under `jax.jit` with the batch
sharded over the mesh, a mean over the batch axis is a mean over the *global* batch (XLA adds
the all-reduce), which is the SyncBatchNorm of the reference. The two views must be separate
calls so that each view is normalised with its own statistics.
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

# PyTorch's default nn.Linear init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)): the reference heads
# are built after the ViT init runs, so they keep it.
torch_linear_init = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')

BN_MOMENTUM = 0.9   # PyTorch momentum 0.1
BN_EPS = 1e-5


def batch_norm(train: bool, name: str, affine: bool = True, dtype: Any = jnp.float32):
  return nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM, epsilon=BN_EPS,
                      use_scale=affine, use_bias=affine, dtype=dtype, name=name)


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
