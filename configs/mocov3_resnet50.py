r"""MoCo v3, ResNet-50 on ImageNet-1k, 100 epochs (68.9% linear-probe top-1 reported).

Batch 4096, LARS (blr 0.6, so lr 9.6; wd 1e-6; 10 warmup epochs), tau 1.0, momentum 0.99 -> 1
(cosine), global BN, zero-init residual, projector 2048-4096-256 with a final BN, predictor
256-4096-256 without one, v3 augmentation with crops from 0.2.

  python -m mocojax.main --config=configs/mocov3_resnet50.py --workdir=gs://BUCKET/mocov3_resnet50 \
      --config.data.data_dir=gs://BUCKET/tensorflow_datasets
"""

from configs import common


def get_config():
  return common.mocov3_resnet()
