r"""The MoCo v3 paper's instability study at CPU scale: learned vs frozen patch projection.

  python -m mocojax.sweep --config=configs/stability_fmnist.py --workdir=runs/stability \
      --grid='optimizer.base_lr=2e-3,8e-3,3.2e-2' --grid='model.stop_grad_patch_embed=False,True'

The demo's ViT and data (Fashion-MNIST, 28 px, patch 7: 16 tokens; width 128, depth 4, 4
heads) at batch 256 for 2 epochs (468 steps) with a short warmup (a quarter epoch), every step
logged (the alarm sees single-step spikes and their exact lags) and kNN every half epoch (the
curve dips are read from). The grid spans the demo's peak learning rate (2e-3 = base_lr x
256/256) to 16x it; the paper's effect would be a learned patch projection (stop_grad False)
that spikes and dips at the high rates where a frozen random one (True) does not.

Sizing (2 CPU cores, Intel Xeon Sapphire Rapids, 2026-11-30, 50-step probes on a machine shared
with other work): ~340 images/s (0.76 s a step), a kNN evaluation 25-55 s, start-up, compiling
and the first save ~1 minute: about 8.5 minutes a run alone, ~51 minutes for the 6 runs above.
--config.epochs=1.5 makes it ~40 minutes.

Expected (that sweep at --config.epochs=1.5, 2026-11-30; README "Stability"): final kNN top-1@20
learned / frozen 75.9 / 77.5 at 3.2e-2, 80.4 / 79.9 at 8e-3, 81.5 / 81.7 at 2e-3; no kNN dips,
one gradient spike (CLS token, learned, 3.2e-2) that did not reach the last block.
"""

from configs import demo


def get_config():
  c = demo.get_config()
  c.batch_size = 256
  c.epochs = 2.0
  c.warmup_epochs = 0.25
  c.optimizer.base_lr = 8e-3
  c.model.stop_grad_patch_embed = False
  c.eval.knn_every_epochs = 0.5  # a kNN curve with 4 points per run to read dips from
  c.eval.knn_ks = (20,)
  c.log_every_steps = 1
  c.checkpoint_every_steps = 200
  c.keep_checkpoints = 1
  return c
