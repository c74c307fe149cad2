r"""Fast linear probe of the Fashion-MNIST demo run (configs/demo.py).

  python -m mocojax.main --config=configs/demo.py --workdir=runs/demo
  python -m mocojax.linear --workdir=runs/demo --config=configs/linear_demo.py

Features of the 60k + 10k images are computed once (centre crop, no augmentation) and five
heads, at 0.01x to 1x the ViT recipe's lr (base 3, so lr 0.03 .. 3 at batch 256), train on them
side by side for 30 epochs; the best head's top-1 on the test split is reported (and written to
runs/demo/linear_probe/result.json). Caching the features is most of the time (minutes on 2 CPU
cores); the 30 epochs on them take seconds.
"""

from configs import linear_probe


def get_config():
  c = linear_probe.get_config()
  c.fast = True
  c.batch_size = 256
  c.epochs = 30.0
  c.lr_multipliers = (0.01, 0.03, 0.1, 0.3, 1.0)
  c.eval_every_epochs = 10
  return c
