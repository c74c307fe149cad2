r"""MoCo v3, ViT-Base/16 on ImageNet-1k: the paper's recipe.

ViT-B/16: the paper reports 76.7% linear-probe top-1.
Batch 4096, AdamW (blr 1.5e-4, so lr 2.4e-3; wd 0.1), 300 epochs with 40 warmup, tau 0.2,
momentum 0.99 -> 1 (cosine), crop scale 0.08-1, frozen random patch projection.

  python -m mocojax.main --config=configs/mocov3_vit_base.py --workdir=gs://BUCKET/mocov3_vit_base \
      --config.data.data_dir=gs://BUCKET/tensorflow_datasets

ImageNet needs a manual download for TFDS (see README). Override anything, e.g.
--config.batch_size=1024 (the lr and every schedule follow).
"""

from configs import common


def get_config():
  return common.mocov3_vit('base', patch_size=16)
