"""A backbone's weights under PyTorch names and layouts, written as safetensors.

ResNet -> torchvision's ResNet: models/resnet.py names its layers as torchvision does and
converts them (`resnet.torchvision_state_dict`); the BN running statistics are part of the
state dict. There is no `fc`: load with strict=False, or replace torchvision's fc first.

ViT -> timm's VisionTransformer: models/vit.py (`timm_vit_state_dict`, whose docstring has the
name and layout table). Each backbone declares its export in its registry entry
(models/backbone.py); this module dispatches and writes the file.
"""

from typing import Any

import flax.linen as nn

from mocojax import models


def state_dict(module: nn.Module, variables: dict, *, image_size: int, channels: int):
  """(tensors, info): PyTorch-named tensors of a backbone, and how to build the PyTorch model."""
  backbone = models.of_module(module)
  if backbone is None:
    raise NotImplementedError(
        f'No PyTorch layout for {type(module).__name__} backbones; export with --format=orbax.')
  return backbone.torch_export(module, variables, image_size, channels)


def save_safetensors(path: str, tensors: dict, metadata: Any = None) -> None:
  from safetensors.numpy import save_file  # only needed for this format
  # 'format': 'pt' tells Hugging Face / timm loaders these are PyTorch-layout tensors.
  save_file(tensors, path, metadata={'format': 'pt', **(metadata or {})})
