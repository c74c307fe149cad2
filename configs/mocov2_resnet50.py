r"""MoCo v2, ResNet-50 on ImageNet-1k, 200 epochs (67.5% linear-probe top-1 reported).

v1 plus an MLP head (2048 -> 2048 -> 128, ReLU, no BN), tau 0.2, blur in the augmentation,
cosine lr. Batch 256, queue 65536, momentum 0.999, SGD lr 0.03, wd 1e-4, crop 0.2-1.

  python -m mocojax.main --config=configs/mocov2_resnet50.py --workdir=gs://BUCKET/mocov2_resnet50 \
      --config.data.data_dir=gs://BUCKET/tensorflow_datasets

--config.symmetric=True uses both views as queries (twice the keys per step).
"""

from configs import common


def get_config():
  return common.mocov1v2_resnet(2)
