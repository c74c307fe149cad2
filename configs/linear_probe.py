r"""Linear probe of a pretraining run, the papers' protocol (the default of mocojax.linear).

  python -m mocojax.linear --workdir=runs/mocov3_vit_small

Fields left None come from the pretraining run: base_lr, epochs and schedule from its recipe
(ViT 3 / ResNet v3 0.1 / v1-v2 30; 90 epochs cosine, or 100 with x0.1 at 60 and 80 for v1/v2),
the data (source, splits, image size, normalisation) and the eval batch from its config.
lr = base_lr * lr_multiplier * batch_size / 256 for each of the `lr_multipliers` heads.
"""

import ml_collections
from ml_collections import FieldReference


def get_config():
  c = ml_collections.ConfigDict()
  c.step = FieldReference(None, field_type=int)          # pretraining checkpoint; None: latest
  c.seed = 0
  c.batch_size = 1024
  c.epochs = FieldReference(None, field_type=float)
  c.base_lr = FieldReference(None, field_type=float)
  c.lr_multipliers = (1.0,)                               # one head per multiplier
  c.schedule = FieldReference(None, field_type=str)      # 'cosine' | 'steps'
  c.decay_at = (0.6, 0.8)                                 # 'steps': x0.1 at these run fractions
  c.momentum = 0.9
  c.weight_decay = 0.0
  c.feature_norm = False                                  # MAE's parameter-free BN on features
  # The baseline: the same probe on the normalised pixels instead of the backbone's features.
  c.raw_pixels = False
  c.fast = False                                          # cache un-augmented features once
  c.crop_scale = (0.08, 1.0)                              # RandomResizedCrop (augmented mode)
  c.eval_batch_size = FieldReference(None, field_type=int)
  c.eval_every_epochs = 0                                 # 0: evaluate at the end only
  c.log_every_steps = 100
  # Augmented mode: rerunning the command resumes from the latest checkpoint.
  c.checkpoint_every_steps = 1000
  c.keep_checkpoints = 2
  c.stop_after_steps = FieldReference(None, field_type=int)   # stop early; a rerun resumes
  # Overrides of the pretraining data config (e.g. data on another path).
  c.data_dir = FieldReference(None, field_type=str)
  c.train_split = FieldReference(None, field_type=str)
  c.eval_split = FieldReference(None, field_type=str)
  return c
