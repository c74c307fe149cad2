r"""BYOL on Fashion-MNIST, sized for a laptop CPU: the MoCo v3 demo with BYOL's objective.

  python -m mocojax.main --config=configs/demo_byol.py --workdir=runs/demo_byol

Everything but the objective is configs/demo.py's (the same small ViT with the frozen random
patch projection, the same projector and predictor, AdamW and lr schedule, 3 epochs at batch
128, the same augmentation), as the MoCo v3 paper compares methods on the same ViT: the target
network is the momentum encoder (0.99 -> 1, cosine), the loss 2 - 2 cos(p, z') summed over both
directions, no negatives.
Expected: TODO(lead): figure
"""

from configs import common, demo


def get_config():
  return common.byol(demo.get_config())
