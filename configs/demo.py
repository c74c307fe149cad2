r"""MoCo v3 on Fashion-MNIST, sized for a laptop CPU (the README's first command).

  python -m mocojax.main --config=configs/demo.py --workdir=runs/demo

A small ViT (width 128, depth 4, patch 4 on 28x28 images) with the v3 objective, frozen patch
projection, AdamW, cosine lr and momentum. Reads the IDX files of Debian's
dataset-fashion-mnist package (`apt-get install dataset-fashion-mnist`); point
--config.data.data_dir elsewhere if yours live elsewhere.
Expected: see README (wall time on 2 CPU cores, kNN top-1 at k=20).
"""

from configs import common


def get_config():
  c = common.mocov3_vit('custom', patch_size=4)
  c.model.width, c.model.depth, c.model.num_heads = 128, 4, 4
  c.head.hidden_dim, c.head.out_dim = 512, 128
  c.batch_size = 256
  c.epochs = 5.0
  c.warmup_epochs = 1.0
  c.optimizer.base_lr = 1.5e-4
  c.data.source = 'idx'
  c.data.name = 'fashion_mnist'
  c.data.data_dir = '/usr/share/datasets/fashion-mnist'
  c.data.eval_split = 'test'
  c.data.image_size = 28
  c.data.crop_scale = (0.2, 1.0)
  c.data.mean, c.data.std = (0.2860,), (0.3530,)
  c.eval.knn_every_epochs = 1
  c.eval.batch_size = 1000
  c.log_every_steps = 20
  c.checkpoint_every_steps = 200
  return c
