r"""MoCo v3 with a ResNet on Fashion-MNIST, sized for a laptop CPU.

  python -m mocojax.main --config=configs/demo_mocov3_resnet.py --workdir=runs/demo_mocov3_resnet

A narrow ResNet-18 (width 0.25: 16 stem channels, 128-d features) with the small-image stem
(3x3 stride-1 conv1, no max-pool) on 28x28 images and the v3 ResNet recipe scaled down: global
BN, zero-init residual, projector 128-512-128 with a final BN, predictor without, LARS, cosine
lr and momentum. Reads Debian's dataset-fashion-mnist IDX files; point --config.data.data_dir
elsewhere if yours live elsewhere.
"""

from configs import common


def get_config():
  c = common.fashion_mnist(common.mocov3_resnet(18))
  c.model.width, c.model.small_stem = 0.25, True
  c.head.hidden_dim, c.head.out_dim = 512, 128
  c.batch_size = 256
  c.epochs = 5.0
  c.warmup_epochs = 1.0
  return c
