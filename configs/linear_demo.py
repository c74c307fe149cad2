r"""Fast linear probe of the Fashion-MNIST demo run (configs/demo.py).

  python -m mocojax.main --config=configs/demo.py --workdir=runs/demo
  python -m mocojax.linear --workdir=runs/demo --config=configs/linear_demo.py

Features of the 60k + 10k images are computed once (centre crop, no augmentation) and five
heads, each behind a parameter-free BN, at 0.01x to 1x the ViT recipe's lr (base 3, so lr
0.03 .. 3 at batch 256), train on them side by side for 100 epochs; the best head's top-1 on the
test split is reported (and written to runs/demo/linear_probe/result.json). About 40 s on 2 CPU
cores, most of it the feature pass. `--config.raw_pixels=True --outdir=runs/demo/linear_raw`
gives the same probe on the normalised pixels, the baseline to beat.

Expected (2026-11-25, 2 CPU cores): on configs/demo_long.py's run 85.2% (raw pixels 84.0%);
on configs/demo.py's 3-epoch run 83.0%, below raw pixels.
"""

from configs import linear_probe


def get_config():
  c = linear_probe.get_config()
  c.fast = True
  c.batch_size = 256
  c.epochs = 100.0             # seconds on cached features; 30 left the heads underfit
  # MAE's parameter-free BN on the features: every lr of the sweep then lands within 0.2%.
  c.feature_norm = True
  c.lr_multipliers = (0.01, 0.03, 0.1, 0.3, 1.0)
  c.eval_every_epochs = 25
  return c
