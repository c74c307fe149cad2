r"""SimCLR on Fashion-MNIST, sized for a laptop CPU: the MoCo v3 demo with SimCLR's objective.

  python -m mocojax.main --config=configs/demo_simclr.py --workdir=runs/demo_simclr

Everything but the objective is configs/demo.py's (the same small ViT with the frozen random
patch projection, the same projector, AdamW and lr schedule, 3 epochs at batch 128, the same
augmentation), as the MoCo v3 paper compares methods on the same ViT: one encoder, no momentum
encoder, no predictor, NT-Xent over the 2 x 128 views of each batch with temperature 0.1.
Expected: TODO(lead): figure
"""

from configs import common, demo


def get_config():
  return common.simclr(demo.get_config())
