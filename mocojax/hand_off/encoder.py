"""The exported encoder: a backbone's weights and the JSON that rebuilds its module.

An encoder directory holds
  model.json         what `load_encoder` needs to rebuild the module (model config, input
                     size and channels, normalisation) and where the weights came from;
  variables/         orbax checkpoint of {'params'} (+ 'batch_stats' for BN backbones): the base
                     encoder's backbone only, no heads, no momentum encoder, no optimizer state;
  model.safetensors  (with --format=safetensors) the same weights under PyTorch names and
                     layouts, see torch_layout.py.

Loading is strict: the checkpoint's keys and shapes must be exactly those of the module that
model.json describes, and the error names every missing, unexpected and mis-shaped key. The one
allowed difference is the input size: a learned position embedding is resampled (bicubic) to the
new patch grid; a sin-cos one is recomputed by the module, so there is nothing to resample.
"""

import json
import os
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp

from mocojax import models, parallel
from mocojax.hand_off import pretraining_run, torch_layout

FORMAT_VERSION = 'mocojax-encoder/1'
MODEL_JSON = 'model.json'
VARIABLES_DIR = 'variables'
SAFETENSORS_FILE = 'model.safetensors'
FORMATS = ('orbax', 'safetensors')

# Model fields that only say how pretraining trained or stored the network, not what it
# computes. They are reset on export so a fine-tuning run trains every layer; pass them to
# `load_encoder` as overrides to change them.
_TRAINING_ONLY = {'stop_grad_patch_embed': False, 'remat': False}
# How the training machine computed attention (e.g. cuDNN, which a CPU does not have): left out,
# so the machine that loads the encoder takes the module's defaults.
_MACHINE_ONLY = ('attention', 'softmax_residual')

_MAX_LISTED = 20


def _flat(tree) -> dict:
  return {parallel.path_name(p): x for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def input_channels(module: nn.Module, params, mean: Sequence[float]) -> int:
  """Channels of the images the backbone was trained on."""
  backbone = models.of_module(module)
  if backbone is not None:
    return backbone.input_channels(params)
  # Otherwise trust the normalisation, which the pipeline applies per channel.
  return len(mean)


def model_config_for_export(model_config) -> dict:
  d = model_config.to_dict() if hasattr(model_config, 'to_dict') else dict(model_config)
  d.update({k: v for k, v in _TRAINING_ONLY.items() if k in d})
  return {k: v for k, v in d.items() if k not in _MACHINE_ONLY}


def write_encoder(out_dir: str, model_config, variables: dict, *, image_size: int,
                  channels: int, mean: Sequence[float], std: Sequence[float],
                  formats: Sequence[str] = ('orbax',), source: Optional[dict] = None) -> dict:
  """Writes an encoder directory from a backbone's model config and variables; returns model.json.

  `variables` is the backbone's {'params'[, 'batch_stats']}; nothing else belongs in it.
  """
  unknown = set(formats) - set(FORMATS)
  if unknown or not formats:
    raise ValueError(f'formats={list(formats)}: use one or more of {FORMATS}.')
  if set(variables) - {'params', 'batch_stats'}:
    raise ValueError(f'variables hold {sorted(variables)}; an encoder is params (+ batch_stats).')
  model = model_config_for_export(model_config)
  module = models.build_backbone(ml_collections.ConfigDict(model))
  info = dict(
      format=FORMAT_VERSION, model=model, image_size=int(image_size), channels=int(channels),
      mean=list(mean), std=list(std),
      feature_dim=int(models.feature_dim(ml_collections.ConfigDict(model))),
      source=source or {}, files={})
  variables = {k: v for k, v in variables.items() if v}  # ViTs have no batch_stats
  os.makedirs(out_dir, exist_ok=True)
  if 'orbax' in formats:
    path = os.path.abspath(os.path.join(out_dir, VARIABLES_DIR))
    with ocp.StandardCheckpointer() as checkpointer:
      checkpointer.save(path, variables, force=True)
    info['files']['orbax'] = VARIABLES_DIR
  if 'safetensors' in formats:
    tensors, torch_info = torch_layout.state_dict(module, variables, image_size=image_size,
                                                  channels=channels)
    if jax.process_index() == 0:
      torch_layout.save_safetensors(os.path.join(out_dir, SAFETENSORS_FILE), tensors,
                                    metadata={'mocojax_model': json.dumps(model)})
    info['files']['safetensors'] = SAFETENSORS_FILE
    info['torch'] = torch_info
  if jax.process_index() == 0:
    with open(os.path.join(out_dir, MODEL_JSON), 'w') as f:
      json.dump(info, f, indent=2)
  return info


def export_encoder(workdir: str, out_dir: str, *, step: Optional[int] = None,
                   formats: Sequence[str] = ('orbax',)) -> dict:
  """Exports the base backbone of the pretraining run in `workdir`; returns model.json."""
  backbone = pretraining_run.restore_backbone(workdir, step)
  d = backbone.config.data
  params = backbone.variables['params']
  return write_encoder(
      out_dir, backbone.config.model, backbone.variables, image_size=d.image_size,
      channels=input_channels(backbone.module, params, d.mean), mean=d.mean, std=d.std,
      formats=formats,
      source=dict(workdir=os.path.abspath(workdir), step=backbone.step,
                  method=backbone.config.method))


def read_model_json(path: str) -> dict:
  file = os.path.join(path, MODEL_JSON)
  if not os.path.exists(file):
    raise FileNotFoundError(f'{file} not found: {path} is not an encoder directory '
                            '(write one with `python -m mocojax.export`).')
  with open(file) as f:
    info = json.load(f)
  if info.get('format') != FORMAT_VERSION:
    raise ValueError(f'{file} has format {info.get("format")!r}; this code reads '
                     f'{FORMAT_VERSION!r}.')
  return info


def _listed(names) -> str:
  names = sorted(names)
  more = f' ... and {len(names) - _MAX_LISTED} more' if len(names) > _MAX_LISTED else ''
  return ', '.join(names[:_MAX_LISTED]) + more


def check_matches(expected, found, where: str) -> None:
  """Raises ValueError naming every key missing, unexpected or mis-shaped in `found`.

  Both trees' leaves need only a `.shape` (arrays, ShapeDtypeStructs, orbax metadata).
  """
  want, have = _flat(expected), _flat(found)
  missing = set(want) - set(have)
  unexpected = set(have) - set(want)
  shapes = [f'{k}: checkpoint {tuple(have[k].shape)}, model {tuple(want[k].shape)}'
            for k in sorted(set(want) & set(have))
            if tuple(want[k].shape) != tuple(have[k].shape)]
  if missing or unexpected or shapes:
    lines = [f'{where} does not match the model:']
    if missing:
      lines.append(f'  missing from the checkpoint ({len(missing)}): {_listed(missing)}')
    if unexpected:
      lines.append(f'  unexpected in the checkpoint ({len(unexpected)}): {_listed(unexpected)}')
    if shapes:
      more = f' ... and {len(shapes) - _MAX_LISTED} more' if len(shapes) > _MAX_LISTED else ''
      lines.append(f'  shape mismatch ({len(shapes)}): ' + '; '.join(shapes[:_MAX_LISTED]) + more)
    raise ValueError('\n'.join(lines))


def load_encoder(path: str, *, image_size: Optional[int] = None, dtype: Any = jnp.float32,
                 sharding: Optional[jax.sharding.Sharding] = None, **model_overrides):
  """Returns (module, variables) of the encoder in `path`, ready for `module.apply`.

    module, variables = load_encoder('runs/demo_encoder')
    features = module.apply(variables, images, train=False)  # [B, feature_dim]

  `variables` is {'params': ...}, plus 'batch_stats' for BN backbones. `image_size` other than
  the exported one resamples a learned position embedding to the new patch grid.
  `model_overrides` replace model.json fields that do not change parameter shapes (remat,
  stop_grad_patch_embed). Arrays are placed on `sharding` (default: the first local device).
  """
  info = read_model_json(path)
  if 'orbax' not in info['files']:
    raise FileNotFoundError(f'{path} was exported without the orbax weights (formats: '
                            f'{sorted(info["files"])}); re-export with --format=orbax.')
  model = ml_collections.ConfigDict({**info['model'], **model_overrides})
  module = models.build_backbone(model, dtype)
  stored_size, channels = info['image_size'], info['channels']
  image_size = int(image_size or stored_size)

  # The module's expected variables at the exported size: what the checkpoint must hold.
  def expected_at(size):
    images = jnp.zeros((1, size, size, channels), jnp.float32)
    return jax.eval_shape(lambda: module.init(jax.random.key(0), images, train=False))

  weights = os.path.abspath(os.path.join(path, info['files']['orbax']))
  sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  with ocp.StandardCheckpointer() as checkpointer:
    stored = checkpointer.metadata(weights).item_metadata.tree
    check_matches(expected_at(stored_size), stored, f'The encoder at {path}')
    abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding),
                            stored)
    variables = checkpointer.restore(weights, abstract)

  if image_size != stored_size:
    backbone = models.of_module(module)
    if backbone is not None and backbone.resize_params is not None:
      params = backbone.resize_params(module, variables['params'], stored_size, image_size)
      variables = dict(variables, params=jax.device_put(params, sharding))
    # Whatever the backbone, what was loaded must now be what the module expects.
    check_matches(expected_at(image_size), variables,
                  f'The encoder at {path} at image_size={image_size}')
  return module, variables
