"""MoCo augmentations as stateless TF ops, following torchvision semantics.

Images are float32 in [0, 1], [H, W, C] (or [B, H, W, C] for the batched
forms). Every random choice is a function of a vector of uniforms `u`, and
`u` of a seed, so results are pure functions of (image, seed); the same code
runs eagerly and inside `tf.data` maps.

Two forms of each op:
  * per example, `op(image, seed, ...)`, seed int32/int64 [2];
  * batched, `op_batch(images, u, ...)`, with one row of uniforms per image.
    On small images the cost is per-op overhead, not arithmetic, so one
    batched call is about as cheap as one per-example call; the training
    pipeline therefore augments whole batches (15x faster on Fashion-MNIST).
The per-example form draws its uniforms and calls the batched one, so the
two agree exactly. The crop is the exception: per example it slices and
calls tf.image.resize (images may differ in size), batched it is two matmuls
with resampling matrices; both use the same window and agree to ~1e-5.

Single-channel images (Fashion-MNIST) are supported throughout: saturation,
hue and grayscale conversion have no meaning there and are no-ops.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np
import tensorflow as tf

# ITU-R 601-2 luma, the weights torchvision's rgb_to_grayscale uses.
_LUMA = (0.299, 0.587, 0.114)

# Uniforms each op consumes. torchvision's crop makes up to 10 attempts of
# (area, aspect, top, left).
CROP_TRIES = 10
CROP_UNIFORMS = 4 * CROP_TRIES
JITTER_UNIFORMS = 9  # apply, 4 for the order, 4 factors
BLUR_UNIFORMS = 2  # apply, sigma


def _draw(seed, n: int):
  return tf.random.stateless_uniform([n], seed, dtype=tf.float32)


def _lerp(u, low, high):
  return low + u * (high - low)


def _per_image(v):
  """Broadcasts a [B] mask or factor against [B, H, W, C]."""
  return tf.reshape(v, [-1, 1, 1, 1])


def _channels(image) -> int:
  channels = image.shape[-1]
  if channels is None:
    raise ValueError('augmentations need a static channel count.')
  return int(channels)


def _static_hw(images):
  h, w = images.shape[-3], images.shape[-2]
  if h is None or w is None:
    raise ValueError('batched augmentations need static image sizes; crop '
                     'variable-size images per example first.')
  return int(h), int(w)


def _one(batched_fn, image, seed, n, *args, **kwargs):
  """Per-example form of a batched op: draw n uniforms, run on a batch of 1."""
  return batched_fn(image[None], _draw(seed, n)[None], *args, **kwargs)[0]


# ------------------------------------------------------------------- cropping

def crop_window_batch(u, height, width, scale=(0.08, 1.0),
                      ratio=(3 / 4, 4 / 3)):
  """(top, left, h, w), int32 [B] each, from u [B, 40].

  torchvision (RandomResizedCrop.get_params) tries up to 10 (area, log-aspect)
  pairs and keeps the first that fits; all 10 are drawn at once here and the
  first valid one picked, the same distribution without a data-dependent
  loop. If none fits it falls back to the largest centred crop with aspect
  clipped to `ratio`. height/width may be scalars or [B].
  """
  t = CROP_TRIES
  # [1, 1] or [B, 1], to broadcast against the tries axis.
  h_f = tf.reshape(tf.cast(height, tf.float32), [-1, 1])
  w_f = tf.reshape(tf.cast(width, tf.float32), [-1, 1])
  target = h_f * w_f * _lerp(u[:, :t], scale[0], scale[1])
  aspect = tf.exp(_lerp(u[:, t:2 * t], math.log(ratio[0]),
                        math.log(ratio[1])))
  w = tf.round(tf.sqrt(target * aspect))
  h = tf.round(tf.sqrt(target / aspect))
  ok = (w > 0) & (w <= w_f) & (h > 0) & (h <= h_f)
  top = tf.floor(u[:, 2 * t:3 * t] * (h_f - h + 1))
  left = tf.floor(u[:, 3 * t:] * (w_f - w + 1))
  first = tf.argmax(tf.cast(ok, tf.int32), axis=1, output_type=tf.int32)

  in_ratio = w_f[:, 0] / h_f[:, 0]
  fb_w = tf.where(in_ratio > ratio[1], tf.round(h_f[:, 0] * ratio[1]),
                  w_f[:, 0])
  fb_h = tf.where(in_ratio < ratio[0], tf.round(w_f[:, 0] / ratio[0]),
                  h_f[:, 0])
  fb_top = tf.floor((h_f[:, 0] - fb_h) / 2)  # torchvision: int((H - h) / 2)
  fb_left = tf.floor((w_f[:, 0] - fb_w) / 2)

  found = tf.reduce_any(ok, axis=1)

  def pick(v, fallback):
    chosen = tf.gather(v, first, batch_dims=1)
    return tf.cast(tf.where(found, chosen, fallback), tf.int32)

  return pick(top, fb_top), pick(left, fb_left), pick(h, fb_h), pick(w, fb_w)


def crop_window(seed, height, width, scale=(0.08, 1.0),
                ratio=(3 / 4, 4 / 3)):
  """Per-example crop_window_batch: int32 scalars (top, left, h, w)."""
  u = _draw(seed, CROP_UNIFORMS)[None]
  return tuple(v[0] for v in crop_window_batch(u, height, width, scale,
                                               ratio))


def _resize_matrix(start, length, in_size: int, out_size: int):
  """[B, out, in] weights resampling [start, start+length) to out_size.

  Triangle filter widened by the downscale factor and renormalised over
  the pixels inside the crop: bilinear with half-pixel centres when
  upscaling, antialiased when downscaling, as tf.image.resize(antialias=True)
  and PIL. Written as a matrix so a whole batch of differently-sized crops
  is two batched matmuls.
  """
  start = tf.cast(start, tf.float32)[:, None, None]
  length = tf.cast(length, tf.float32)[:, None, None]
  step = length / out_size
  support = tf.maximum(step, 1.0)
  centres = start + (tf.range(out_size, dtype=tf.float32)[None, :, None] +
                     0.5) * step
  pixels = tf.range(in_size, dtype=tf.float32)[None, None, :] + 0.5
  weights = tf.nn.relu(1.0 - tf.abs(pixels - centres) / support)
  inside = (pixels > start) & (pixels < start + length)
  weights = tf.where(inside, weights, 0.0)
  return weights / tf.reduce_sum(weights, axis=-1, keepdims=True)


def resized_crop_batch(images, top, left, h, w, size: int):
  """Crops [B, H, W, C] at per-image windows and resizes each to size x size.

  Matches tf.slice + tf.image.resize(bilinear, antialias=True) to float
  rounding.
  """
  height, width = _static_hw(images)
  rows = _resize_matrix(top, h, height, size)
  cols = _resize_matrix(left, w, width, size)
  return tf.clip_by_value(_separable(images, rows, cols), 0.0, 1.0)


def random_resized_crop_batch(images, u, size: int, scale=(0.08, 1.0),
                              ratio=(3 / 4, 4 / 3)):
  """Batched RandomResizedCrop of same-sized images; u [B, 40]."""
  height, width = _static_hw(images)
  top, left, h, w = crop_window_batch(u, height, width, scale, ratio)
  return resized_crop_batch(images, top, left, h, w, size)


def resized_crop(image, top, left, h, w, size: int):
  """One crop of a (possibly dynamic-size) image, resized to size x size.

  Antialiasing matches PIL's bilinear resize, which the MoCo reference code
  used (torchvision's tensor path too, by default since 0.17).
  """
  crop = tf.slice(image, tf.stack([top, left, 0]), tf.stack([h, w, -1]))
  out = tf.image.resize(crop, [size, size], method='bilinear', antialias=True)
  out = tf.clip_by_value(out, 0.0, 1.0)
  out.set_shape([size, size, image.shape[-1]])
  return out


def random_resized_crop_from_uniforms(image, u, size: int,
                                      scale=(0.08, 1.0),
                                      ratio=(3 / 4, 4 / 3)):
  """Per-example RandomResizedCrop for any image size; u [40]."""
  shape = tf.shape(image)
  top, left, h, w = (v[0] for v in crop_window_batch(
      u[None], shape[0], shape[1], scale, ratio))
  return resized_crop(image, top, left, h, w, size)


def random_resized_crop(image, seed, size: int, scale=(0.08, 1.0),
                        ratio=(3 / 4, 4 / 3)):
  """torchvision RandomResizedCrop: random area/aspect crop to size x size."""
  return random_resized_crop_from_uniforms(
      image, _draw(seed, CROP_UNIFORMS), size, scale, ratio)


def center_crop(image, size: int):
  """Centre [size, size] crop (torchvision CenterCrop rounding) of an
  [H, W, C] image or [B, H, W, C] batch."""
  hw = tf.shape(image)[-3:-1]
  offsets = tf.cast(tf.round(tf.cast(hw - size, tf.float32) / 2), tf.int32)
  return tf.image.crop_to_bounding_box(image, offsets[0], offsets[1], size,
                                       size)


def resize_shorter(image, size: int):
  """Resize so the shorter side is `size`, keeping aspect (torchvision Resize,
  which truncates the longer side); [H, W, C] or [B, H, W, C]."""
  hw = tf.cast(tf.shape(image)[-3:-1], tf.float32)
  short = tf.reduce_min(hw)
  new = tf.cast(tf.floor(hw * (size / short)), tf.int32)
  new = tf.where(hw == short, size, new)
  out = tf.image.resize(image, new, method='bilinear', antialias=True)
  return tf.clip_by_value(out, 0.0, 1.0)


# --------------------------------------------------------------------- colour

def _grayscale(images):
  weights = tf.constant(_LUMA, images.dtype)
  return tf.reduce_sum(images * weights, axis=-1, keepdims=True)


def _saturation(x, factor):
  # A blend with the grayscale image, as torchvision; tf.image's version
  # scales HSV saturation instead, which clips differently.
  f = _per_image(factor)
  return tf.clip_by_value(f * x + (1 - f) * _grayscale(x), 0.0, 1.0)


def _hue(x, delta):
  # Same unit as torchvision's hue_factor: a fraction of the hue circle.
  # tf.image.adjust_hue takes one delta per call, so rotate in HSV here.
  hsv = tf.image.rgb_to_hsv(x)
  hue = tf.math.floormod(hsv[..., :1] + _per_image(delta), 1.0)
  return tf.image.hsv_to_rgb(tf.concat([hue, hsv[..., 1:]], axis=-1))


def color_jitter_batch(x, u, brightness=0.4, contrast=0.4, saturation=0.4,
                       hue=0.1, p: float = 1.0):
  """Batched ColorJitter in RandomApply(p); u [B, 9].

  Every image gets its own factors and its own order of the four ops. At
  each of the four stages, brightness and contrast are both per-image affine
  maps (f * x and f * x + (1 - f) * mean), so one affine pass serves every
  image that picked either; saturation and hue are computed for the batch
  and kept where picked. Ops of strength 0 are skipped as in torchvision,
  and saturation/hue on one channel.
  """
  if p <= 0.0:
    return x
  ones = tf.ones_like(u[:, 0])

  def factor(col, strength):
    return _lerp(u[:, col], max(0.0, 1 - strength), 1 + strength)

  order = tf.cast(tf.argsort(u[:, 1:5], axis=1), tf.int32)
  colour = _channels(x) == 3
  y = x
  for stage in range(4):
    picked = order[:, stage]
    scale, shift = ones, 0.0 * ones
    if brightness:
      scale = tf.where(picked == 0, factor(5, brightness), scale)
    if contrast:
      # torchvision blends with the mean of the grayscale image.
      mean = tf.reduce_mean(_grayscale(y) if colour else y, axis=[1, 2, 3])
      f = factor(6, contrast)
      scale = tf.where(picked == 1, f, scale)
      shift = tf.where(picked == 1, (1 - f) * mean, shift)
    y = tf.clip_by_value(_per_image(scale) * y + _per_image(shift), 0.0, 1.0)
    if saturation and colour:
      y = tf.where(_per_image(picked == 2),
                   _saturation(y, factor(7, saturation)), y)
    if hue and colour:
      y = tf.where(_per_image(picked == 3),
                   _hue(y, _lerp(u[:, 8], -hue, hue)), y)
  return tf.where(_per_image(u[:, 0] < p), y, x)


def color_jitter(image, seed, brightness=0.4, contrast=0.4, saturation=0.4,
                 hue=0.1, p: float = 1.0):
  """torchvision ColorJitter wrapped in RandomApply(p).

  brightness/contrast/saturation factors ~ U[max(0, 1 - x), 1 + x],
  hue ~ U[-hue, hue]; the four ops run in a random order. On one channel
  saturation and hue are no-ops (brightness and contrast still apply).
  """
  return _one(color_jitter_batch, image, seed, JITTER_UNIFORMS, brightness,
              contrast, saturation, hue, p)


def random_grayscale_batch(x, u, p: float = 0.2):
  """Batched RandomGrayscale; u [B, 1]. No-op on one channel."""
  if _channels(x) == 1 or p <= 0.0:
    return x
  gray = tf.tile(_grayscale(x), [1, 1, 1, _channels(x)])
  return tf.where(_per_image(u[:, 0] < p), gray, x)


def random_grayscale(image, seed, p: float = 0.2):
  """RandomGrayscale: luma replicated to all channels; no-op on 1 channel."""
  return _one(random_grayscale_batch, image, seed, 1, p)


def solarize_batch(x, u, p: float = 0.2, threshold: float = 0.5):
  """Batched RandomSolarize; u [B, 1]."""
  if p <= 0.0:
    return x
  solar = tf.where(x >= threshold, 1.0 - x, x)
  return tf.where(_per_image(u[:, 0] < p), solar, x)


def solarize(image, seed, p: float = 0.2, threshold: float = 0.5):
  """Inverts pixels >= threshold (PIL ImageOps.solarize / torchvision)."""
  return _one(solarize_batch, image, seed, 1, p, threshold)


def random_flip_batch(x, u):
  """Batched horizontal flip with probability 1/2; u [B, 1]."""
  return tf.where(_per_image(u[:, 0] < 0.5), tf.reverse(x, axis=[2]), x)


def random_flip(image, seed):
  """Horizontal flip with probability 1/2."""
  return _one(random_flip_batch, image, seed, 1)


# ----------------------------------------------------------------------- blur

def blur_kernel_size(image_size: int, sigma_max: float) -> int:
  """Odd kernel size: torchvision's 23 at 224 scaled to the image, widened
  to cover +-3 sigma so large sigmas on small images are not truncated, and
  capped so reflect padding fits inside the image."""
  scaled = round(23 * image_size / 224)
  wide = 2 * math.ceil(3 * sigma_max) + 1
  k = max(scaled, wide, 3)
  k = min(k, 2 * image_size - 1)
  return k if k % 2 == 1 else k - 1


def _blur_matrix(sigma, size: int, kernel_size: int):
  """[B, size, size]: 1-D Gaussian of per-image sigma with reflect padding
  (torchvision's padding) folded in, so blurring is two batched matmuls.

  Only the kernel_size tap weights depend on the image; where each tap of
  each output pixel lands (reflected at the borders without repeating the
  edge pixel) is a constant [taps, size * size] incidence matrix.
  """
  radius = kernel_size // 2
  if radius >= size:
    raise ValueError(f'blur kernel {kernel_size} too wide for {size} px.')
  offsets = np.arange(-radius, radius + 1)
  pos = np.abs(np.arange(size)[:, None] + offsets[None, :])
  pos = (size - 1) - np.abs((size - 1) - pos)
  incidence = np.zeros((kernel_size, size, size), np.float32)
  for t in range(kernel_size):
    np.add.at(incidence[t], (np.arange(size), pos[:, t]), 1.0)
  taps = tf.constant(offsets, tf.float32)
  weights = tf.exp(-0.5 * tf.square(taps[None, :] / sigma[:, None]))
  weights = weights / tf.reduce_sum(weights, axis=1, keepdims=True)
  matrix = tf.matmul(weights, incidence.reshape(kernel_size, size * size))
  return tf.reshape(matrix, [-1, size, size])


def _separable(images, rows, cols):
  """rows @ image @ cols^T per image and channel: [B,H,W,C] -> [B,P,Q,C]
  for rows [B,P,H], cols [B,Q,W]."""
  x = tf.transpose(images, [0, 3, 1, 2])
  x = tf.matmul(tf.matmul(rows[:, None], x), cols[:, None], transpose_b=True)
  return tf.transpose(x, [0, 2, 3, 1])


def gaussian_blur_batch(x, u, p: float = 0.5, sigma=(0.1, 2.0),
                        kernel_size: int | None = None):
  """Batched GaussianBlur with sigma ~ U[sigma] per image; u [B, 2]."""
  if p <= 0.0:
    return x
  height, width = _static_hw(x)
  if kernel_size is None:
    kernel_size = blur_kernel_size(min(height, width), float(sigma[1]))
  s = _lerp(u[:, 1], sigma[0], sigma[1])
  rows = _blur_matrix(s, height, kernel_size)
  cols = rows if width == height else _blur_matrix(s, width, kernel_size)
  blurred = _separable(x, rows, cols)
  return tf.where(_per_image(u[:, 0] < p), blurred, x)


def gaussian_blur(image, seed, p: float = 0.5, sigma=(0.1, 2.0),
                  kernel_size: int | None = None):
  """Gaussian blur with sigma ~ U[sigma] (pixels), applied with prob p.

  sigma is in pixels as in MoCo v2/v3 (tuned for 224 px); the kernel size
  defaults to `blur_kernel_size` of the image size. Needs a static size.
  """
  return _one(gaussian_blur_batch, image, seed, BLUR_UNIFORMS, p, sigma,
              kernel_size)


def normalize(image, mean: Sequence[float], std: Sequence[float]):
  """(image - mean) / std per channel."""
  mean = tf.constant(mean, tf.float32)
  std = tf.constant(std, tf.float32)
  return (image - mean) / std


# -------------------------------------------------------------------- recipes

@dataclasses.dataclass(frozen=True)
class ViewSpec:
  """One view's augmentation pipeline, in torchvision transform order."""
  crop_scale: tuple = (0.08, 1.0)
  crop_ratio: tuple = (3 / 4, 4 / 3)
  jitter: tuple = (0.4, 0.4, 0.2, 0.1)  # brightness, contrast, sat., hue
  jitter_p: float = 0.8
  grayscale_p: float = 0.2
  # MoCo v1 converts to grayscale before jittering; later recipes after.
  grayscale_first: bool = False
  blur_p: float = 0.0
  blur_sigma: tuple = (0.1, 2.0)
  blur_kernel_size: int | None = None
  solarize_p: float = 0.0
  flip: bool = True


_V2 = ViewSpec(crop_scale=(0.2, 1.0), jitter=(0.4, 0.4, 0.4, 0.1),
               jitter_p=0.8, blur_p=0.5)
RECIPES = {
    'mocov1': (ViewSpec(crop_scale=(0.2, 1.0), jitter=(0.4, 0.4, 0.4, 0.4),
                        jitter_p=1.0, grayscale_first=True),) * 2,
    'mocov2': (_V2, _V2),
    'mocov3': (ViewSpec(blur_p=1.0),
               ViewSpec(blur_p=0.1, solarize_p=0.2)),
}

# Layout of one view's uniforms: [crop | jitter | gray | blur | solarize |
# flip]. The crop slice comes first so it can be used on its own when
# variable-size images are cropped per example.
_J = CROP_UNIFORMS
_G = _J + JITTER_UNIFORMS
_B = _G + 1
_S = _B + BLUR_UNIFORMS
_F = _S + 1
VIEW_UNIFORMS = _F + 1


def crop_view(image, u, spec: ViewSpec, image_size: int):
  """The crop of one view for one (any-size) image; u [VIEW_UNIFORMS]."""
  return random_resized_crop_from_uniforms(image, u[:_J], image_size,
                                           spec.crop_scale, spec.crop_ratio)


def crop_view_batch(images, u, spec: ViewSpec, image_size: int):
  """The crops of one view for a batch of same-size images; u [B, K]."""
  return random_resized_crop_batch(images, u[:, :_J], image_size,
                                   spec.crop_scale, spec.crop_ratio)


def finish_view_batch(x, u, spec: ViewSpec):
  """Everything after the crop, on a batch of cropped images; u [B, K]."""
  jit = lambda y: color_jitter_batch(y, u[:, _J:_G], *spec.jitter,
                                     p=spec.jitter_p)
  gray = lambda y: random_grayscale_batch(y, u[:, _G:_B], spec.grayscale_p)
  x = jit(gray(x)) if spec.grayscale_first else gray(jit(x))
  x = gaussian_blur_batch(x, u[:, _B:_S], spec.blur_p, spec.blur_sigma,
                          spec.blur_kernel_size)
  x = solarize_batch(x, u[:, _S:_F], spec.solarize_p)
  if spec.flip:
    x = random_flip_batch(x, u[:, _F:])
  return x


def view_specs(recipe: str, crop_scale=None, **overrides):
  """The recipe's two ViewSpecs with `crop_scale` and field overrides."""
  if recipe not in RECIPES:
    raise ValueError(f'Unknown recipe {recipe!r}; expected one of '
                     f'{sorted(RECIPES)}.')
  fields = {f.name for f in dataclasses.fields(ViewSpec)}
  unknown = set(overrides) - fields
  if unknown:
    raise TypeError(f'Unknown augmentation overrides {sorted(unknown)}; '
                    f'known: {sorted(fields)}.')
  if crop_scale is not None:
    overrides = dict(overrides, crop_scale=tuple(crop_scale))
  return tuple(dataclasses.replace(s, **overrides) for s in RECIPES[recipe])


def two_views(recipe: str, *, image_size: int, crop_scale=None,
              mean: Sequence[float], std: Sequence[float], **overrides):
  """(view1_fn, view2_fn), each fn(uint8 [H,W,C], seed int[2]) -> float32
  [image_size, image_size, C] normalised.

  `overrides` replace ViewSpec fields in both views (e.g. blur_sigma,
  jitter_p); `crop_scale` is a named argument since configs set it most.
  """
  specs = view_specs(recipe, crop_scale, **overrides)

  def make(spec):
    def view(image, seed):
      u = _draw(seed, VIEW_UNIFORMS)
      x = crop_view(tf.image.convert_image_dtype(image, tf.float32), u, spec,
                    image_size)
      return normalize(finish_view_batch(x[None], u[None], spec)[0], mean,
                       std)
    return view

  return make(specs[0]), make(specs[1])
