r"""MoCo v3, ResNet-50 on ImageNet-1k, 300 epochs (72.8% linear-probe top-1 reported).

The 100-epoch recipe with blr 0.3 (lr 4.8), wd 1e-6, momentum 0.99 -> 1.

  python -m mocojax.main --config=configs/mocov3_resnet50_300ep.py \
      --workdir=gs://BUCKET/mocov3_resnet50_300ep --config.data.data_dir=gs://BUCKET/tensorflow_datasets
"""

from configs import common


def get_config():
  c = common.mocov3_resnet()
  c.epochs = 300.0
  c.optimizer.base_lr = 0.3
  return c
