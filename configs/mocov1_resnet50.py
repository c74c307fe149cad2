r"""MoCo v1, ResNet-50 on ImageNet-1k: the paper's recipe (60.6% linear-probe top-1 reported).

Batch 256 with per-GPU BN over groups of 32 and shuffling BN for the keys, a 128-d linear head,
queue K = 65536, tau 0.07, momentum 0.999, SGD (lr 0.03, wd 1e-4) x0.1 at epochs 120 and 160,
200 epochs, the v1 augmentation (crop 0.2-1, grayscale then strong colour jitter).

  python -m mocojax.main --config=configs/mocov1_resnet50.py --workdir=gs://BUCKET/mocov1_resnet50 \
      --config.data.data_dir=gs://BUCKET/tensorflow_datasets

A different --config.batch_size scales the lr (lr = 0.03 x batch / 256); queue_size must stay a
multiple of it.
"""

from configs import common


def get_config():
  return common.mocov1v2_resnet(1)
