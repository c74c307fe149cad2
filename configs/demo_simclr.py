r"""SimCLR on Fashion-MNIST, sized for a laptop CPU: the MoCo v3 demo with SimCLR's objective.

  python -m mocojax.main --config=configs/demo_simclr.py --workdir=runs/demo_simclr

Everything but the objective is configs/demo.py's (the same small ViT with the frozen random
patch projection, the same projector, AdamW and lr schedule, 3 epochs at batch 128, the same
augmentation), as the MoCo v3 paper compares methods on the same ViT: one encoder, no momentum
encoder, no predictor, NT-Xent over the 2 x 128 views of each batch with temperature 0.1.
Expected (2 CPU cores, Intel Xeon Sapphire Rapids, 2026-12-01, other work sharing the machine):
8:25 wall time (~475 images/s), kNN top-1 82.8% at k=20 (80.0% at k=200) after 3 epochs (81.7%
and 82.5% after epochs 1 and 2), online linear probe 73.5%: level with the MoCo v3 demo's 82.4%.
"""

from configs import common, demo


def get_config():
  return common.simclr(demo.get_config())
