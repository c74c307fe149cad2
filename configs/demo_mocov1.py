r"""MoCo v1 on Fashion-MNIST, sized for a laptop CPU.

  python -m mocojax.main --config=configs/demo_mocov1.py --workdir=runs/demo_mocov1

A narrow ResNet-18 (width 0.25: 16 stem channels, 128-d features) with the small-image stem
(3x3 stride-1 conv1, no max-pool) on 28x28 images, the v1 objective with a 128-d linear head,
a queue of 4096 keys, per-group BN over 32 images with shuffling BN for the keys, tau 0.07,
momentum 0.999, SGD with lr steps. Reads Debian's dataset-fashion-mnist IDX files; point
--config.data.data_dir elsewhere if yours live elsewhere.
"""

from configs import common


def get_config():
  c = common.fashion_mnist(common.mocov1v2_resnet(1))
  c.model = common.resnet_model(18, width=0.25, small_stem=True, bn_stats='group',
                                bn_group_size=32)
  c.queue_size = 4096
  c.epochs = 5.0
  c.optimizer.decay_epochs = (3, 4)
  c.data.crop_scale = (0.2, 1.0)
  return c
