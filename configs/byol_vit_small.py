r"""BYOL, ViT-Small/16 on ImageNet-1k, as the MoCo v3 paper compares it (its Table 4).

From the MoCo v3 paper's comparison: the same ViT-S/16 with the frozen random patch projection,
300 epochs, an online network with a predictor and a target (momentum) network whose momentum
goes 0.99 -> 1 on a cosine schedule; BYOL's loss, 2 - 2 cos(p, z') summed over both directions,
no negatives. Everything else is the MoCo v3 recipe's own (configs/mocov3_vit_small.py), not a
value stated for BYOL: batch 4096, AdamW (blr 1.5e-4, wd 0.1), 40 warmup epochs, the 3-layer
projector and 2-layer predictor (hidden 4096, out 256, both ending in BN; BYOL's own are 2
layers without a last BN), crop scale 0.08-1 and the v3 augmentation (BYOL's).
Expected: the linear-probe top-1 in the MoCo v3 paper's Table 4 for this model and method (not
copied here: it could not be checked against the paper when this file was written).

  python -m mocojax.main --config=configs/byol_vit_small.py --workdir=gs://BUCKET/byol_vit_small \
      --config.data.data_dir=gs://BUCKET/tensorflow_datasets

ImageNet needs a manual download for TFDS (see README).
"""

from configs import common, mocov3_vit_small


def get_config():
  return common.byol(mocov3_vit_small.get_config())
