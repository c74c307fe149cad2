"""What the rest of mocojax knows about a kind of backbone, declared once, in its own module.

models/vit.py and models/resnet.py each end with a `BACKBONE = Backbone(...)`; models/__init__.py
lists them by `model.name`. The trainer, the optimizer, the evaluations and the export ask the
registry, so a new backbone is one file plus one registry line.
"""

import dataclasses
from typing import Callable


@dataclasses.dataclass(frozen=True)
class Backbone:
  module: type                 # its flax module class
  build: Callable              # (model_config, dtype) -> module mapping [B, H, W, C] to [B, D]
  feature_dim: Callable        # model_config -> D
  grad_probes: Callable        # model_config -> {'first_layer', 'last_block'}: parameter prefixes
  frozen_prefixes: Callable    # model_config -> parameter prefixes never trained
  feature_name: Callable       # model_config -> what the features are, for reports
  input_channels: Callable     # backbone params -> channels of the images it was trained on
  torch_export: Callable       # (module, variables, image_size, channels) -> (tensors, info)
  probe_recipe: dict           # the reference linear probe: base_lr, epochs, schedule
  # Optional: None where the backbone has no such thing.
  layer_ids: Callable | None = None    # module -> (name -> layer 0..n for layer-wise lr decay, n)
  resize_params: Callable | None = None  # (module, params, old, new image size) -> params
