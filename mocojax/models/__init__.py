"""Backbones by name (`model.name`), each declared once in its own module (models/backbone.py),
and the layer groups of a parameter tree (with their gradients' infinity-norms)."""

import re

import jax
import jax.numpy as jnp

from mocojax import parallel
from mocojax.models import resnet as resnet_lib
from mocojax.models import vit as vit_lib
from mocojax.models.backbone import Backbone

REGISTRY = {'vit': vit_lib.BACKBONE, 'resnet': resnet_lib.BACKBONE}
BACKBONES = tuple(REGISTRY)


def backbone(model_config) -> Backbone:
  """The registry entry of model_config.name."""
  if model_config.name not in REGISTRY:
    raise ValueError(f'model.name={model_config.name!r} is not a known backbone; use one of '
                     f'{BACKBONES}.')
  return REGISTRY[model_config.name]


def of_module(module) -> Backbone | None:
  """The registry entry of a built backbone module, or None for a module of no registered kind."""
  return next((b for b in REGISTRY.values() if isinstance(module, b.module)), None)


def build_backbone(model_config, dtype=jnp.float32):
  """Returns a flax module mapping images [B,H,W,C] to features [B,D]."""
  return backbone(model_config).build(model_config, dtype)


def feature_dim(model_config) -> int:
  return backbone(model_config).feature_dim(model_config)


def grad_probes(model_config) -> dict:
  """Parameter-path prefixes whose gradient infinity-norm is logged every step.

  'first_layer' is a ResNet's conv1 or the ViT patch projection, or, when that is frozen (its
  gradient is zero), the first trained layer; 'last_block' is the backbone's last block (MoCo v3
  paper, Fig. 5).
  """
  return backbone(model_config).grad_probes(model_config)


def frozen_prefixes(model_config) -> tuple:
  """Parameter-path prefixes of the backbone that are never trained (the v3 frozen patch
  projection)."""
  return tuple(backbone(model_config).frozen_prefixes(model_config))


def feature_name(model_config) -> str:
  return backbone(model_config).feature_name(model_config)


# Backbone modules before the blocks, in the order the input meets them.
_STEM = ('patch_embed', 'conv1', 'bn1', 'cls_token', 'pos_embedding')
_BLOCK = re.compile(r'(?:blocks|layer(\d+))_(\d+)')
_HEADS = ('projector', 'head', 'predictor')


def _group_order(top: str, child: str | None):
  if top != 'backbone':
    return (1, _HEADS.index(top) if top in _HEADS else len(_HEADS), top)
  block = _BLOCK.fullmatch(child)
  if block:
    return (0, 1, int(block.group(1) or 0), int(block.group(2)))
  if child in _STEM:
    return (0, 0, _STEM.index(child))
  return (0, 2, child)  # the final norm and anything after the blocks


def layer_groups(params) -> list:
  """Parameter-path prefixes of each layer group, from input to output.

  The backbone's stem modules (patch projection; conv1, bn1), each block, the final norm,
  then the projector (or v1/v2 head) and the predictor: the rows of the v3 paper's Fig. 5.
  `params` may be abstract (ShapeDtypeStructs).
  """
  groups = []
  for top, sub in params.items():
    if top == 'backbone':
      groups += [(top, child) for child in sub]
    else:
      groups.append((top, None))
  return order_layer_groups(f'{top}/{child}' if child else top for top, child in groups)


def order_layer_groups(names) -> list:
  """Layer-group names ('backbone/blocks_3', 'projector', ...) from input to output: the order
  of `layer_groups`, for readers of logged metrics that have only the names."""
  split = [tuple(n.split('/', 1)) if '/' in n else (n, None) for n in names]
  split.sort(key=lambda g: _group_order(*g))
  return [f'{top}/{child}' if child else top for top, child in split]


def max_abs_under(tree, prefix: str):
  """Infinity-norm of the leaves at or under `prefix`; NaN (or inf) if any of them has one."""
  prefix = prefix.rstrip('/')
  leaves = [jnp.max(jnp.abs(x)) for path, x in jax.tree_util.tree_leaves_with_path(tree)
            if (name := parallel.path_name(path)) == prefix or name.startswith(prefix + '/')]
  return jnp.max(jnp.stack(leaves)) if leaves else jnp.float32(jnp.nan)


def group_inf_norms(tree, groups) -> jax.Array:
  """[len(groups)] infinity-norms of `tree` (e.g. gradients) per layer group: one vector, so
  that the host's per-step finite check fetches one array and can name the first bad group."""
  return jnp.stack([max_abs_under(tree, g) for g in groups])
