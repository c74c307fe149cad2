"""The host half of the MoCo augmentations: random resized crops.

RandomResizedCrop follows torchvision: crop windows drawn as its `get_params` does (stateless TF
ops), then crop and resize with PIL's antialiased bilinear filter, the very call the MoCo
reference code makes (torchvision's PIL path), so crops are PIL's uint8 pixels bit for bit
(given pixels decoded as PIL decodes the file, which file sources ensure).
Everything after the crop runs on the accelerator (`photometric`). Every random choice is a
function of a vector of uniforms `u`, so crops are pure functions of (image, uniforms) and the
same code runs eagerly and inside `tf.data` maps.

Two forms of the crop:
  * per example (`resized_crops`), for images of any size (files): all views of one image in one
    call to PIL (`tf.numpy_function`). Given the encoded bytes (`Source.fetch`), TF decodes
    those whose pixels it gets as PIL does (RGB and grey JPEGs: outside Python's lock) and PIL
    the rest inside that call (`sources.tf_decodes_as_pil`). PIL's fixed-point resize is ~2.3x
    faster than TF's ScaleAndTranslate kernel on 224 px crops and releases the GIL, so tf.data's
    threads run it in parallel (bench/RESULTS.md);
  * batched (`resized_crop_batch`), for same-size in-memory images (Fashion-MNIST): two
    matmuls with resampling matrices per image, one call per step. On small images the cost is
    per-op overhead, not arithmetic, so a whole batch costs about as much as one image.
Both resample with the same filter and agree to a grey level (PIL rounds between its passes).
"""

from __future__ import annotations

import math

import numpy as np
import tensorflow as tf
from PIL import Image

from mocojax.data import sources

# Uniforms one crop consumes: torchvision makes up to 10 attempts of (area, aspect, top, left).
CROP_TRIES = 10
CROP_UNIFORMS = 4 * CROP_TRIES


def _draw(seed, n: int):
  return tf.random.stateless_uniform([n], seed, dtype=tf.float32)


def _lerp(u, low, high):
  return low + u * (high - low)


def _static_hw(images):
  h, w = images.shape[-3], images.shape[-2]
  if h is None or w is None:
    raise ValueError('batched crops need static image sizes; crop variable-size images per '
                     'example.')
  return int(h), int(w)


def to_uint8(x):
  """Rounds [0, 255]-valued floats to uint8 (PIL's resize output is uint8 too)."""
  return tf.cast(tf.round(tf.clip_by_value(x, 0.0, 255.0)), tf.uint8)


# ------------------------------------------------------------------------------- windows
def crop_window_batch(u, height, width, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
  """(top, left, h, w), int32 [B] each, from u [B, 40].

  torchvision (RandomResizedCrop.get_params) tries up to 10 (area, log-aspect) pairs and keeps
  the first that fits; all 10 are drawn at once here and the first valid one picked, the same
  distribution without a data-dependent loop. If none fits it falls back to the largest
  centred crop with aspect clipped to `ratio`. height/width may be scalars or [B].
  """
  t = CROP_TRIES
  # [1, 1] or [B, 1], to broadcast against the tries axis.
  h_f = tf.reshape(tf.cast(height, tf.float32), [-1, 1])
  w_f = tf.reshape(tf.cast(width, tf.float32), [-1, 1])
  target = h_f * w_f * _lerp(u[:, :t], scale[0], scale[1])
  aspect = tf.exp(_lerp(u[:, t:2 * t], math.log(ratio[0]), math.log(ratio[1])))
  w = tf.round(tf.sqrt(target * aspect))
  h = tf.round(tf.sqrt(target / aspect))
  ok = (w > 0) & (w <= w_f) & (h > 0) & (h <= h_f)
  top = tf.floor(u[:, 2 * t:3 * t] * (h_f - h + 1))
  left = tf.floor(u[:, 3 * t:] * (w_f - w + 1))
  first = tf.argmax(tf.cast(ok, tf.int32), axis=1, output_type=tf.int32)

  in_ratio = w_f[:, 0] / h_f[:, 0]
  fb_w = tf.where(in_ratio > ratio[1], tf.round(h_f[:, 0] * ratio[1]), w_f[:, 0])
  fb_h = tf.where(in_ratio < ratio[0], tf.round(w_f[:, 0] / ratio[0]), h_f[:, 0])
  fb_top = tf.floor((h_f[:, 0] - fb_h) / 2)  # torchvision: int((H - h) / 2)
  fb_left = tf.floor((w_f[:, 0] - fb_w) / 2)

  found = tf.reduce_any(ok, axis=1)

  def pick(v, fallback):
    chosen = tf.gather(v, first, batch_dims=1)
    return tf.cast(tf.where(found, chosen, fallback), tf.int32)

  return pick(top, fb_top), pick(left, fb_left), pick(h, fb_h), pick(w, fb_w)


def crop_window(seed, height, width, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
  """Per-example crop_window_batch: int32 scalars (top, left, h, w)."""
  u = _draw(seed, CROP_UNIFORMS)[None]
  return tuple(v[0] for v in crop_window_batch(u, height, width, scale, ratio))


# -------------------------------------------------------------------------------- resize
def _pil_resize(image, boxes: np.ndarray, height: int, width: int, channels: int) -> np.ndarray:
  """uint8 [V, height, width, C]: image cropped to each (top, left, h, w) of boxes [V, 4] and
  resized by PIL (bilinear, antialiased when downscaling). `image` is uint8 [H, W, C] pixels or
  encoded bytes, which PIL decodes here."""
  out = np.empty((len(boxes), height, width, channels), np.uint8)
  encoded = sources.encoded_bytes(image)
  if encoded is not None:
    decoded = sources.open_image(encoded, channels)
  for v, (top, left, h, w) in enumerate(boxes.tolist()):
    # Crop first, as torchvision does (PIL's resize(box=...) would filter across the box edge).
    if encoded is not None:
      whole = (top, left, h, w) == (0, 0, decoded.height, decoded.width)
      crop = decoded if whole else decoded.crop((left, top, left + w, top + h))
    else:  # in numpy: PIL then copies only the crop into its own layout, not the whole image
      crop = image[top:top + h, left:left + w]
      crop = Image.fromarray(np.ascontiguousarray(crop[..., 0] if channels == 1 else crop))
    out[v] = np.asarray(crop.resize((width, height), Image.BILINEAR)).reshape(
        height, width, channels)
  return out


def _channels(image, channels):
  if image.dtype == tf.string:
    if channels is None:
      raise ValueError('crops of encoded images need `channels`.')
    return channels
  return int(image.shape[-1])


def resized_crops(image, boxes, size: int, channels=None):
  """Crops of one image of any size at boxes int32 [V, 4] of (top, left, h, w) (V static), each
  resized to size x size: uint8 [V, size, size, C]. `image` is uint8 [H, W, C] or encoded bytes
  (a tf.string scalar, decoded as PIL decodes it to `channels`). PIL's resize, as the MoCo
  reference (torchvision's RandomResizedCrop on PIL images)."""
  channels = _channels(image, channels)

  def crops(x):
    out = tf.numpy_function(lambda i, b: _pil_resize(i, b, size, size, channels), [x, boxes],
                            tf.uint8, stateful=False)
    out.set_shape([boxes.shape[0], size, size, channels])
    return out
  if image.dtype != tf.string:
    return crops(image)
  # TF's decode where it is PIL's (it runs outside Python's lock; PIL's decode in the crop call
  # measured slower in tf.data's threads, bench/RESULTS.md session 11), PIL's elsewhere.
  return sources.with_pil_pixels(image, channels, crops)


def random_resized_crops(image, u, size: int, scales, ratios, channels=None):
  """torchvision RandomResizedCrop of one image of any size (uint8 pixels, or encoded bytes
  decoded to `channels`), once per view v with uniforms u[v] [40], scale range scales[v] and
  aspect range ratios[v]: [V, size, size, C]."""
  height, width = tf.unstack(sources.image_size(image))
  boxes = [tf.stack([w[0] for w in crop_window_batch(u[v][None], height, width, scale, ratio)])
           for v, (scale, ratio) in enumerate(zip(scales, ratios))]
  return resized_crops(image, tf.stack(boxes), size, channels)


def random_resized_crop(image, u, size: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                        channels=None):
  """torchvision RandomResizedCrop of one image of any size (pixels or bytes); u [40]."""
  return random_resized_crops(image, u[None], size, [scale], [ratio], channels)[0]


def _resize_matrix(start, length, in_size: int, out_size: int):
  """[B, out, in] weights resampling [start, start+length) to out_size.

  Triangle filter widened by the downscale factor and renormalised over the pixels inside the
  crop: bilinear with half-pixel centres when upscaling, antialiased when downscaling, as
  tf.image.resize(antialias=True) and PIL.
  """
  start = tf.cast(start, tf.float32)[:, None, None]
  length = tf.cast(length, tf.float32)[:, None, None]
  step = length / out_size
  support = tf.maximum(step, 1.0)
  centres = start + (tf.range(out_size, dtype=tf.float32)[None, :, None] + 0.5) * step
  pixels = tf.range(in_size, dtype=tf.float32)[None, None, :] + 0.5
  weights = tf.nn.relu(1.0 - tf.abs(pixels - centres) / support)
  inside = (pixels > start) & (pixels < start + length)
  weights = tf.where(inside, weights, 0.0)
  return weights / tf.reduce_sum(weights, axis=-1, keepdims=True)


def resized_crop_batch(images, top, left, h, w, size: int):
  """Crops uint8 [B, H, W, C] at per-image windows, each resized to uint8 [size, size, C]."""
  height, width = _static_hw(images)
  rows = _resize_matrix(top, h, height, size)
  cols = _resize_matrix(left, w, width, size)
  x = tf.transpose(tf.cast(images, tf.float32), [0, 3, 1, 2])
  x = tf.matmul(tf.matmul(rows[:, None], x), cols[:, None], transpose_b=True)
  return to_uint8(tf.transpose(x, [0, 2, 3, 1]))


def random_resized_crop_batch(images, u, size: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
  """Batched RandomResizedCrop of same-size uint8 images; u [B, 40]."""
  height, width = _static_hw(images)
  top, left, h, w = crop_window_batch(u, height, width, scale, ratio)
  return resized_crop_batch(images, top, left, h, w, size)


# ---------------------------------------------------------------------------- evaluation
def center_crop(image, size: int):
  """Centre [size, size] crop (torchvision CenterCrop rounding) of [H, W, C] or [B, H, W, C]."""
  hw = tf.shape(image)[-3:-1]
  offsets = tf.cast(tf.round(tf.cast(hw - size, tf.float32) / 2), tf.int32)
  return tf.image.crop_to_bounding_box(image, offsets[0], offsets[1], size, size)


def resize_shorter(image, size: int, channels=None):
  """Resize so the shorter side is `size`, keeping aspect (torchvision Resize, which truncates
  the longer side, with PIL's filter as in the reference evaluation); uint8 [H, W, C] or
  [B, H, W, C] in and out, or encoded bytes in (decoded to `channels` as PIL decodes them)."""
  channels = _channels(image, channels)
  hw = tf.cast(sources.image_size(image), tf.float32)
  short = tf.reduce_min(hw)
  new = tf.cast(tf.floor(hw * (size / short)), tf.int32)
  new = tf.where(hw == short, size, new)

  def resize(images, hw, new):
    box = np.array([[0, 0, *hw.astype(int)]])
    one = lambda x: _pil_resize(x, box, int(new[0]), int(new[1]), channels)[0]
    single = sources.encoded_bytes(images) is not None or images.ndim == 3
    return one(images) if single else np.stack([one(x) for x in images])

  def resized(x):
    out = tf.numpy_function(resize, [x, hw, new], tf.uint8, stateful=False)
    batch = x.shape[:-3] if x.dtype != tf.string else []
    out.set_shape(tf.TensorShape(batch).concatenate([None, None, channels]))
    return out
  if image.dtype != tf.string:
    return resized(image)
  return sources.with_pil_pixels(image, channels, resized)
