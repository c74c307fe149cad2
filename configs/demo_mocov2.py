r"""MoCo v2 on Fashion-MNIST, sized for a laptop CPU.

  python -m mocojax.main --config=configs/demo_mocov2.py --workdir=runs/demo_mocov2

A narrow ResNet-18 (width 0.25: 16 stem channels, 128-d features) with the small-image stem
(3x3 stride-1 conv1, no max-pool) on 28x28 images, the v2 objective with the MLP head
(128 -> 128 -> 128), a queue of 4096 keys, per-group BN over 32 images with shuffling BN for the
keys, tau 0.2, SGD with cosine lr, the v2 augmentation. Reads Debian's dataset-fashion-mnist IDX
files; point --config.data.data_dir elsewhere if yours live elsewhere.

Scaled as configs/demo_mocov1.py (4 epochs at batch 128, key momentum 0.99, lr 0.03 at batch
128), plus the blur of the demo ViT: sigma 0.1-1 px at 28 px instead of 0.1-2 px at 224 px.

Expected (2 CPU cores, Intel Xeon Sapphire Rapids, 2026-11-25, nothing else running): 17 min 33 s
wall time (~295 images/s), kNN top-1 81.9%, 83.3%, 83.8%, 83.5% after epochs 1-4 (k=20, T=0.07,
global-average-pooled backbone features; 80.8% at k=200), online linear probe 77.0%.
"""

from configs import common


def get_config():
  c = common.fashion_mnist(common.mocov1v2_resnet(2))
  c.model = common.resnet_model(18, width=0.25, small_stem=True, bn_stats='group',
                                bn_group_size=32)
  c.queue_size = 4096
  c.momentum.base = 0.99
  c.batch_size = 128
  c.epochs = 4.0
  c.optimizer.base_lr = 0.06
  c.data.augment.blur_sigma = (0.1, 1.0)
  c.online_probe.lr = 1e-2
  return c
