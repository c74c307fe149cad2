r"""SimCLR, ViT-Small/16 on ImageNet-1k, as the MoCo v3 paper compares it (its Table 4).

From the MoCo v3 paper's comparison: the same ViT-S/16 with the frozen random patch projection,
300 epochs, one encoder (no momentum encoder, no predictor), NT-Xent over both views of the
global batch with temperature 0.1. Everything else is the MoCo v3 recipe's own
(configs/mocov3_vit_small.py), not a value stated for SimCLR: batch 4096, AdamW (blr 1.5e-4,
wd 0.1), 40 warmup epochs, the 3-layer projector (hidden 4096, out 256, last BN), crop scale
0.08-1 and the v3 augmentation.
Expected: the linear-probe top-1 in the MoCo v3 paper's Table 4 for this model and method (not
copied here: it could not be checked against the paper when this file was written).

  python -m mocojax.main --config=configs/simclr_vit_small.py --workdir=gs://BUCKET/simclr_vit_small \
      --config.data.data_dir=gs://BUCKET/tensorflow_datasets

ImageNet needs a manual download for TFDS (see README).
"""

from configs import common, mocov3_vit_small


def get_config():
  return common.simclr(mocov3_vit_small.get_config())
