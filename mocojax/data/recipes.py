"""The papers' two-view augmentation recipes, as data (no TensorFlow, no JAX).

A ViewSpec lists one view's transforms in torchvision's order. The host (`augment`, TF) applies
the crop; the device (`photometric`, JAX) applies the rest.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class ViewSpec:
  """One view's augmentation pipeline, in torchvision transform order."""
  crop_scale: tuple = (0.08, 1.0)
  crop_ratio: tuple = (3 / 4, 4 / 3)
  jitter: tuple = (0.4, 0.4, 0.2, 0.1)  # brightness, contrast, saturation, hue
  jitter_p: float = 0.8
  grayscale_p: float = 0.2
  # MoCo v1 converts to grayscale before jittering; later recipes after.
  grayscale_first: bool = False
  blur_p: float = 0.0
  blur_sigma: tuple = (0.1, 2.0)
  blur_kernel_size: int | None = None
  solarize_p: float = 0.0
  flip: bool = True


_V2 = ViewSpec(crop_scale=(0.2, 1.0), jitter=(0.4, 0.4, 0.4, 0.1), jitter_p=0.8, blur_p=0.5)
RECIPES = {
    'mocov1': (ViewSpec(crop_scale=(0.2, 1.0), jitter=(0.4, 0.4, 0.4, 0.4), jitter_p=1.0,
                        grayscale_first=True),) * 2,
    'mocov2': (_V2, _V2),
    'mocov3': (ViewSpec(blur_p=1.0), ViewSpec(blur_p=0.1, solarize_p=0.2)),
}


def view_specs(recipe: str, crop_scale=None, **overrides):
  """The recipe's two ViewSpecs with `crop_scale` and field overrides."""
  if recipe not in RECIPES:
    raise ValueError(f'Unknown recipe {recipe!r}; expected one of {sorted(RECIPES)}.')
  fields = {f.name for f in dataclasses.fields(ViewSpec)}
  unknown = set(overrides) - fields
  if unknown:
    raise TypeError(f'Unknown augmentation overrides {sorted(unknown)}; known: {sorted(fields)}.')
  if crop_scale is not None:
    overrides = dict(overrides, crop_scale=tuple(crop_scale))
  return tuple(dataclasses.replace(s, **overrides) for s in RECIPES[recipe])
