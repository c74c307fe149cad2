"""Backbones by name: `build_backbone(config.model)`."""

import jax.numpy as jnp

from mocojax.models import resnet as resnet_lib
from mocojax.models import vit as vit_lib

BACKBONES = ('vit', 'resnet')


def build_backbone(model_config, dtype=jnp.float32):
  """Returns a flax module mapping images [B,H,W,C] to features [B,D]."""
  name = model_config.name
  if name == 'vit':
    return vit_lib.vit(**{**model_config.to_dict(), 'dtype': dtype})
  if name == 'resnet':
    return resnet_lib.resnet(**{**model_config.to_dict(), 'dtype': dtype})
  raise ValueError(f'model.name={name!r} is not a known backbone; use one of {BACKBONES}.')


def feature_dim(model_config) -> int:
  if model_config.name == 'vit':
    return model_config.get('width') or vit_lib.SIZES[model_config.variant][0]
  if model_config.name == 'resnet':
    return resnet_lib.feature_dim(model_config.depth, model_config.get('width', 1.0))
  raise ValueError(f'model.name={model_config.name!r} is not a known backbone; use one of {BACKBONES}.')


def grad_probes(model_config) -> dict:
  """Parameter-path prefixes whose gradient infinity-norm is logged every step.

  'first_layer' is a ResNet's conv1 or the ViT patch projection, or, when that is frozen (its
  gradient is zero), the first trained layer; 'last_block' is the backbone's last block (MoCo v3
  paper, Fig. 5).
  """
  if model_config.name == 'vit':
    depth = model_config.get('depth') or vit_lib.SIZES[model_config.variant][1]
    first = ('backbone/blocks_0/attn/qkv' if model_config.get('stop_grad_patch_embed')
             else 'backbone/patch_embed')
    return {'first_layer': first, 'last_block': f'backbone/blocks_{depth - 1}'}
  if model_config.name == 'resnet':
    _, counts = resnet_lib.stages(model_config.depth)
    return {'first_layer': 'backbone/conv1/', 'last_block': f'backbone/layer4_{counts[-1] - 1}/'}
  raise ValueError(f'model.name={model_config.name!r} is not a known backbone; use one of {BACKBONES}.')
