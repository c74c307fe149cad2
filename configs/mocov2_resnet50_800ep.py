r"""MoCo v2, ResNet-50 on ImageNet-1k, 800 epochs (71.1% linear-probe top-1 reported).

The 200-epoch recipe (configs/mocov2_resnet50.py) with a 4x longer cosine schedule.

  python -m mocojax.main --config=configs/mocov2_resnet50_800ep.py \
      --workdir=gs://BUCKET/mocov2_resnet50_800ep --config.data.data_dir=gs://BUCKET/tensorflow_datasets
"""

from configs import common


def get_config():
  c = common.mocov1v2_resnet(2)
  c.epochs = 800.0
  return c
