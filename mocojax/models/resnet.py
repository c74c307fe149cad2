"""ResNets as torchvision builds them (v1.5), the backbone of MoCo v1/v2 and the v3 ResNet runs.

v1.5: in a bottleneck block the stride sits on the 3x3 conv (conv2), not on the first 1x1.
Convs have no bias and are initialised kaiming-normal (fan_out, ReLU gain); BN starts at
gamma=1, beta=0, or gamma=0 on the last BN of each residual block with `zero_init_residual`
(MoCo v3 turns it on, so every block starts as the identity). Padding is explicit and
symmetric, as PyTorch's, so that transferred weights give the same features. The feature is
the global average pool of the last stage (2048-d for ResNet-50, 512-d for ResNet-18/34); there
is no classifier: the MoCo heads take its place.

Names follow torchvision: conv1, bn1, layer{1-4}_{i}/{conv1,bn1,conv2,...,downsample_0,
downsample_1}. An export is '_' -> '.' on module names, kernel -> weight (transposed HWIO ->
OIHW), scale -> weight, mean/var -> running_mean/running_var.

Two knobs outside torchvision: `small_stem` (a 3x3 stride-1 conv1 and no max-pool, the usual
CIFAR stem, for 28-32 px inputs) and `width`, a multiplier on every conv's channels (64 * width
in the stem) for narrow CPU demos.
"""

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from mocojax.models import norm
from mocojax.models.backbone import Backbone

# depth -> (block, blocks per stage)
STAGES = {
    18: ('basic', (2, 2, 2, 2)),
    34: ('basic', (3, 4, 6, 3)),
    50: ('bottleneck', (3, 4, 6, 3)),
    101: ('bottleneck', (3, 4, 23, 3)),
    152: ('bottleneck', (3, 8, 36, 3)),
}
EXPANSION = {'basic': 1, 'bottleneck': 4}

# torchvision: kaiming_normal_(mode='fan_out', nonlinearity='relu'); jax's 'normal' is untruncated.
conv_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


def base_width(width: float) -> int:
  channels = int(round(64 * width))
  if channels < 1:
    raise ValueError(f'model.width={width} leaves the stem with no channels.')
  return channels


def feature_dim(depth: int = 50, width: float = 1.0) -> int:
  block, _ = stages(depth)
  return base_width(width) * 8 * EXPANSION[block]


def stages(depth: int):
  if depth not in STAGES:
    raise ValueError(f'model.depth={depth} is not a ResNet depth; use one of {sorted(STAGES)}.')
  return STAGES[depth]


def _conv(features: int, kernel: int, stride: int, name: str, dtype):
  pad = kernel // 2
  return nn.Conv(features, (kernel, kernel), (stride, stride), padding=((pad, pad), (pad, pad)),
                 use_bias=False, kernel_init=conv_init, dtype=dtype, name=name)


class BasicBlock(nn.Module):
  """3x3 -> 3x3 (ResNet-18/34)."""
  planes: int
  stride: int
  norm: Any
  zero_init_last: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    last_init = nn.initializers.zeros if self.zero_init_last else nn.initializers.ones
    y = nn.relu(self.norm(name='bn1')(_conv(self.planes, 3, self.stride, 'conv1', self.dtype)(x)))
    y = self.norm(name='bn2', scale_init=last_init)(_conv(self.planes, 3, 1, 'conv2', self.dtype)(y))
    return nn.relu(y + _shortcut(self, x, self.planes))


class Bottleneck(nn.Module):
  """1x1 -> 3x3 (strided: v1.5) -> 1x1 with 4x the channels (ResNet-50/101/152)."""
  planes: int
  stride: int
  norm: Any
  zero_init_last: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    last_init = nn.initializers.zeros if self.zero_init_last else nn.initializers.ones
    y = nn.relu(self.norm(name='bn1')(_conv(self.planes, 1, 1, 'conv1', self.dtype)(x)))
    y = nn.relu(self.norm(name='bn2')(_conv(self.planes, 3, self.stride, 'conv2', self.dtype)(y)))
    y = self.norm(name='bn3', scale_init=last_init)(_conv(self.planes * 4, 1, 1, 'conv3', self.dtype)(y))
    return nn.relu(y + _shortcut(self, x, self.planes * 4))


def _shortcut(block: nn.Module, x, out_channels: int):
  """Identity, or torchvision's downsample (1x1 strided conv + BN) when the shape changes."""
  if block.stride == 1 and x.shape[-1] == out_channels:
    return x
  # Called from the block's compact __call__, so these layers are the block's children.
  conv = nn.Conv(out_channels, (1, 1), (block.stride, block.stride), padding='VALID',
                 use_bias=False, kernel_init=conv_init, dtype=block.dtype, name='downsample_0')
  return block.norm(name='downsample_1')(conv(x))


class ResNet(nn.Module):
  """Images [B, H, W, C] (any C) -> globally pooled features [B, feature_dim]."""
  depth: int = 50
  width: float = 1.0
  small_stem: bool = False
  zero_init_residual: bool = False
  bn_stats: str = 'global'      # see norm.py: 'global' (v3) or 'group' (v1/v2)
  bn_group_size: int = 32
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images, train: bool = False):
    kind, counts = stages(self.depth)
    block = BasicBlock if kind == 'basic' else Bottleneck
    base = base_width(self.width)
    bn = functools.partial(norm.BatchNorm, use_running_average=not train, stats=self.bn_stats,
                           group_size=self.bn_group_size, dtype=self.dtype)

    x = images.astype(self.dtype)
    if self.small_stem:
      x = _conv(base, 3, 1, 'conv1', self.dtype)(x)
      x = nn.relu(bn(name='bn1')(x))
    else:
      x = _conv(base, 7, 2, 'conv1', self.dtype)(x)
      x = nn.relu(bn(name='bn1')(x))
      x = nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
    for stage, n in enumerate(counts):
      for i in range(n):
        stride = 2 if stage > 0 and i == 0 else 1
        x = block(base * 2**stage, stride, bn, self.zero_init_residual, self.dtype,
                  name=f'layer{stage + 1}_{i}')(x)
    return jnp.mean(x, axis=(1, 2))


def resnet(**kwargs) -> ResNet:
  """A ResNet from a model config's fields (those that are not ResNet fields are ignored)."""
  fields = {f.name for f in dataclasses.fields(ResNet)}
  model = ResNet(**{k: v for k, v in kwargs.items() if k in fields and v is not None})
  stages(model.depth)      # fail on a bad depth or width before anything is traced
  base_width(model.width)
  if model.bn_stats not in norm.STATS:
    raise ValueError(f'model.bn_stats={model.bn_stats!r} is unknown; use one of {norm.STATS}.')
  return model


def torchvision_state_dict(params, batch_stats) -> dict:
  """The backbone's variables as torchvision ResNet state_dict entries (numpy, PyTorch layouts).

  Renaming plus transposes: conv kernels HWIO -> OIHW; BN scale/bias/mean/var -> weight/bias/
  running_mean/running_var. There is no `fc` (load with strict=False, or add the MoCo head's),
  and no `num_batches_tracked` (unused with a fixed BN momentum).
  """
  renames = {'kernel': 'weight', 'scale': 'weight', 'bias': 'bias', 'mean': 'running_mean',
             'var': 'running_var'}
  out = {}
  for tree in (params, batch_stats):
    for path, value in traverse_util.flatten_dict(tree).items():
      name = '.'.join(p.replace('_', '.') for p in path[:-1]) + '.' + renames[path[-1]]
      value = np.asarray(value)
      out[name] = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value
  return out


def torchvision_resnet_info(module: ResNet, channels: int) -> dict:
  """How to build the torchvision model these tensors load into, and what differs from stock."""
  changes = []
  if module.small_stem:
    changes.append(f'conv1 = Conv2d({channels}, {base_width(module.width)}, 3, 1, 1, '
                   'bias=False); maxpool = Identity()')
  elif channels != 3:
    changes.append(f'conv1 = Conv2d({channels}, 64, 7, 2, 3, bias=False)')
  if module.width != 1.0:
    changes.append(f'every conv {module.width}x as wide (no torchvision argument does this)')
  changes.append('fc = Identity() (the export has no classifier; or load with strict=False)')
  return dict(library='torchvision', model=f'resnet{module.depth}', changes=changes)


def _torch_export(module: ResNet, variables: dict, image_size: int, channels: int):
  del image_size  # any size: global average pooling
  tensors = torchvision_state_dict(variables['params'], variables.get('batch_stats', {}))
  tensors = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()}
  return tensors, torchvision_resnet_info(module, channels)


def _grad_probes(model_config) -> dict:
  _, counts = stages(model_config.depth)
  return {'first_layer': 'backbone/conv1/', 'last_block': f'backbone/layer4_{counts[-1] - 1}/'}


BACKBONE = Backbone(
    module=ResNet,
    build=lambda model_config, dtype: resnet(**{**model_config.to_dict(), 'dtype': dtype}),
    feature_dim=lambda c: feature_dim(c.depth, c.get('width', 1.0)),
    grad_probes=_grad_probes,
    frozen_prefixes=lambda c: (),
    feature_name=lambda c: 'ResNet global-average-pooled features',
    input_channels=lambda params: int(params['conv1']['kernel'].shape[2]),  # [k, k, C, width]
    torch_export=_torch_export,
    probe_recipe=dict(base_lr=0.1, epochs=90.0, schedule='cosine'))
