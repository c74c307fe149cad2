r"""MoCo v3, ResNet-50 on ImageNet-1k, 1000 epochs (74.6% linear-probe top-1 reported).

The 100-epoch recipe with blr 0.3 (lr 4.8), wd 1.5e-6, momentum 0.996 -> 1.

  python -m mocojax.main --config=configs/mocov3_resnet50_1000ep.py \
      --workdir=gs://BUCKET/mocov3_resnet50_1000ep --config.data.data_dir=gs://BUCKET/tensorflow_datasets
"""

from configs import common


def get_config():
  c = common.mocov3_resnet()
  c.epochs = 1000.0
  c.optimizer.base_lr = 0.3
  c.optimizer.weight_decay = 1.5e-6
  c.momentum.base = 0.996
  return c
