r"""BYOL, ViT-Base/16 on ImageNet-1k, as the MoCo v3 paper compares it (its Table 4).

The recipe of configs/byol_vit_small.py (its docstring says which values come from the paper
and which are the MoCo v3 recipe's own) on the ViT-B/16 of configs/mocov3_vit_base.py.
Expected: the linear-probe top-1 in the MoCo v3 paper's Table 4 for this model and method (not
copied here: it could not be checked against the paper when this file was written).

  python -m mocojax.main --config=configs/byol_vit_base.py --workdir=gs://BUCKET/byol_vit_base \
      --config.data.data_dir=gs://BUCKET/tensorflow_datasets
"""

from configs import common, mocov3_vit_base


def get_config():
  return common.byol(mocov3_vit_base.get_config())
