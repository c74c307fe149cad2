r"""The CPU demo trained longer: MoCo v3, small ViT, Fashion-MNIST, 10 epochs.

  python -m mocojax.main --config=configs/demo_long.py --workdir=runs/demo_long

The recipe of configs/demo.py (ViT width 128, depth 4, patch 7; batch 128) for 10 epochs
instead of 3, with kNN every 2 epochs. Wall time and kNN accuracy on 2 CPU cores: see README.
"""

from configs import demo


def get_config():
  c = demo.get_config()
  c.epochs = 10.0
  c.warmup_epochs = 1.0
  c.eval.knn_every_epochs = 2
  c.checkpoint_every_steps = 1000
  return c
