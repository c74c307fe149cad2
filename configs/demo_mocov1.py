r"""MoCo v1 on Fashion-MNIST, sized for a laptop CPU.

  python -m mocojax.main --config=configs/demo_mocov1.py --workdir=runs/demo_mocov1

A narrow ResNet-18 (width 0.25: 16 stem channels, 128-d features) with the small-image stem
(3x3 stride-1 conv1, no max-pool) on 28x28 images, the v1 objective with a 128-d linear head,
a queue of 4096 keys, per-group BN over 32 images with shuffling BN for the keys, tau 0.07,
SGD with lr x0.1 at 60% and 80% of the run, the v1 augmentation. Reads Debian's
dataset-fashion-mnist IDX files; point --config.data.data_dir elsewhere if yours live elsewhere.

Scaled for a 20-minute CPU budget (~300 images/s on 2 cores): 4 epochs at batch 128, and two
settings of the authors' own CIFAR-10 demo rather than of the 200-epoch ImageNet recipe: key
momentum 0.99 (0.999 would leave the key encoder ~40% its random init after the run's 1,872
steps) and a queue of 4096 keys. The lr is the recipe's 0.03, reached at batch 128
(base_lr 0.06), since the linear scaling rule would halve it at this batch.

Expected (2 CPU cores, Intel Xeon Sapphire Rapids, 2026-11-25, nothing else running): 17 min 18 s
wall time (~280 images/s), kNN top-1 80.5%, 81.4%, 81.6%, 81.5% after epochs 1-4 (k=20, T=0.07,
global-average-pooled backbone features; 79.8% at k=200), online linear probe 77.7%.
"""

from configs import common


def get_config():
  c = common.fashion_mnist(common.mocov1v2_resnet(1))
  c.model = common.resnet_model(18, width=0.25, small_stem=True, bn_stats='group',
                                bn_group_size=32)
  c.queue_size = 4096
  c.momentum.base = 0.99
  c.batch_size = 128
  c.epochs = 4.0
  c.optimizer.base_lr = 0.06
  c.optimizer.decay_epochs = (2.4, 3.2)   # 60% and 80% of the run, as 120/160 of 200
  c.online_probe.lr = 1e-2
  return c
