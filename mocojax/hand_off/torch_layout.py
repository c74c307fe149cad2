"""A backbone's weights under PyTorch names and layouts, written as safetensors.

ResNet -> torchvision's ResNet: models/resnet.py names its layers as torchvision does and
converts them (`resnet.torchvision_state_dict`); the BN running statistics are part of the
state dict. There is no `fc`: load with strict=False, or replace torchvision's fc first.

ViT -> timm's VisionTransformer (the model the MoCo v3 reference builds on):

  ours (flax, backbone/...)             timm                          layout change
  patch_embed/kernel [p, p, C, D]       patch_embed.proj.weight       -> [D, C, p, p]
  patch_embed/bias                      patch_embed.proj.bias
  cls_token [1, 1, D]                   cls_token                     same
  (sincos table | pos_embed [N, D])     pos_embed [1, 1 + N, D]       zero row for [CLS] first
  blocks_i/norm{1,2}/{scale,bias}       blocks.i.norm{1,2}.{weight,bias}
  blocks_i/attn/qkv/kernel [D, 3D]      blocks.i.attn.qkv.weight      -> [3D, D]
  blocks_i/attn/proj                    blocks.i.attn.proj
  blocks_i/fc{1,2}                      blocks.i.mlp.fc{1,2}
  norm | fc_norm                        norm | fc_norm                (pool 'cls' | 'gap')

Every Dense kernel [in, out] becomes a Linear weight [out, in]. The [CLS] token gets no position
embedding in MoCo v3; a zero row in timm's table is the same computation. A fixed sin-cos table
is written as timm's (learnable) pos_embed, which computes the same features.

The qkv split needs no permutation: both sides read the fused output as [3, heads, head_dim].
Note that MoCo v3's ViT-Small has 12 heads where timm's `vit_small_patch16_224` has 6; heads do
not change any shape, so create the timm model with num_heads=12 (the `torch.kwargs` that
export writes into model.json say so), or the features will differ.
"""

from typing import Any

import flax.linen as nn
import numpy as np

from mocojax.models import resnet as resnet_lib
from mocojax.models import vit as vit_lib

_LINEARS = (('attn/qkv', 'attn.qkv'), ('attn/proj', 'attn.proj'), ('fc1', 'mlp.fc1'),
            ('fc2', 'mlp.fc2'))
_NORMS = (('norm1', 'norm1'), ('norm2', 'norm2'))


def _np(x) -> np.ndarray:
  return np.asarray(x, dtype=np.float32)


def _linear(out: dict, name: str, layer: dict) -> None:
  out[f'{name}.weight'] = _np(layer['kernel']).T
  out[f'{name}.bias'] = _np(layer['bias'])


def _layer_norm(out: dict, name: str, layer: dict) -> None:
  out[f'{name}.weight'] = _np(layer['scale'])
  out[f'{name}.bias'] = _np(layer['bias'])


def timm_kwargs(module: vit_lib.ViT, image_size: int, channels: int) -> dict:
  """Keyword arguments of timm's VisionTransformer that build the same network, headless."""
  if module.pool == 'gap' and not module.gap_norm:
    raise ValueError("pool='gap' with gap_norm=False (no final norm) has no counterpart among "
                     "timm VisionTransformer's standard arguments.")
  return dict(img_size=int(image_size), patch_size=module.patch_size, in_chans=int(channels),
              embed_dim=module.width, depth=module.depth, num_heads=module.num_heads,
              mlp_ratio=module.mlp_ratio, qkv_bias=True, class_token=True,
              global_pool='token' if module.pool == 'cls' else 'avg',
              fc_norm=module.pool == 'gap', num_classes=0)


def timm_vit_state_dict(module: vit_lib.ViT, params: dict, image_size: int) -> dict:
  """{timm name: float32 numpy array}, in the order timm's state_dict() lists them."""
  timm_kwargs(module, image_size, channels=1)  # refuses variants timm cannot express
  p, d = module.patch_size, module.width
  grid = image_size // p
  out = {}
  out['cls_token'] = _np(params['cls_token']).reshape(1, 1, d)
  if module.posemb == 'sincos2d':
    table = vit_lib.sincos2d_position_embedding(grid, grid, d)
  elif module.posemb == 'learned':
    table = _np(params['pos_embed'])
    if table.shape[0] != grid * grid:
      raise ValueError(f'pos_embed has {table.shape[0]} rows but image_size={image_size} with '
                       f'patch {p} makes {grid}x{grid} patches.')
  else:  # 'none': timm always adds a table; zeros add nothing.
    table = np.zeros((grid * grid, d), np.float32)
  out['pos_embed'] = np.concatenate([np.zeros((1, d), np.float32), table])[None]
  # [p, p, C, D] (row, col, channel, out) -> conv weight [out, channel, row, col].
  out['patch_embed.proj.weight'] = _np(params['patch_embed']['kernel']).transpose(3, 2, 0, 1)
  out['patch_embed.proj.bias'] = _np(params['patch_embed']['bias'])
  for i in range(module.depth):
    block = params[f'blocks_{i}']
    _layer_norm(out, f'blocks.{i}.norm1', block['norm1'])
    _linear(out, f'blocks.{i}.attn.qkv', block['attn']['qkv'])
    _linear(out, f'blocks.{i}.attn.proj', block['attn']['proj'])
    _layer_norm(out, f'blocks.{i}.norm2', block['norm2'])
    _linear(out, f'blocks.{i}.mlp.fc1', block['fc1'])
    _linear(out, f'blocks.{i}.mlp.fc2', block['fc2'])
  if module.pool == 'cls':
    _layer_norm(out, 'norm', params['norm'])
  else:
    _layer_norm(out, 'fc_norm', params['fc_norm'])
  return {k: np.ascontiguousarray(v) for k, v in out.items()}


def torchvision_resnet_info(module: resnet_lib.ResNet, channels: int) -> dict:
  """How to build the torchvision model these tensors load into, and what differs from stock."""
  changes = []
  if module.small_stem:
    changes.append(f'conv1 = Conv2d({channels}, {resnet_lib.base_width(module.width)}, 3, 1, 1, '
                   'bias=False); maxpool = Identity()')
  elif channels != 3:
    changes.append(f'conv1 = Conv2d({channels}, 64, 7, 2, 3, bias=False)')
  if module.width != 1.0:
    changes.append(f'every conv {module.width}x as wide (no torchvision argument does this)')
  changes.append('fc = Identity() (the export has no classifier; or load with strict=False)')
  return dict(library='torchvision', model=f'resnet{module.depth}', changes=changes)


def state_dict(module: nn.Module, variables: dict, *, image_size: int, channels: int):
  """(tensors, info): PyTorch-named tensors of a backbone, and how to build the PyTorch model."""
  if isinstance(module, vit_lib.ViT):
    tensors = timm_vit_state_dict(module, variables['params'], image_size)
    return tensors, dict(library='timm', model='VisionTransformer',
                         kwargs=timm_kwargs(module, image_size, channels))
  if isinstance(module, resnet_lib.ResNet):
    tensors = resnet_lib.torchvision_state_dict(variables['params'],
                                                variables.get('batch_stats', {}))
    tensors = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()}
    return tensors, torchvision_resnet_info(module, channels)
  raise NotImplementedError(
      f'No PyTorch layout for {type(module).__name__} backbones; export with --format=orbax.')


def save_safetensors(path: str, tensors: dict, metadata: Any = None) -> None:
  from safetensors.numpy import save_file  # only needed for this format
  # 'format': 'pt' tells Hugging Face / timm loaders these are PyTorch-layout tensors.
  save_file(tensors, path, metadata={'format': 'pt', **(metadata or {})})
