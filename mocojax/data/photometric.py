"""The photometric half of the MoCo augmentations, in JAX, run on the accelerator.

The host crops and resizes (decoding is there); everything after the crop, i.e. colour jitter,
grayscale, Gaussian blur, solarize, horizontal flip and normalisation, is a few MFLOP per image
against hundreds of GFLOP of train step, so it runs on the device as one jitted function of
uint8 crops. That keeps the host's work to decode + crop + resize and sends uint8 instead of
float32 to the device.

Randomness: every example's uniforms come from a key of (seed, step, row of the global batch),
so a batch stays a pure function of (seed, step), whatever the number of hosts or devices and
however the batch is sharded (each row's draw is local to the device holding it).

Semantics follow torchvision's tensor ops on images in [0, 1]. Each op is written for one planar
image [C, H, W] and its own uniforms, with `lax.cond` where torchvision draws "apply or not";
a batch runs either
  * vmapped (`per_image=False`, for GPUs and TPUs): conds become selects and the whole batch is
    one set of wide kernels; or
  * mapped image by image (`per_image=True`, for CPUs): conds really skip the costly work not
    drawn (90% of view 2's blurs, 20% of the jitters) and each image stays in cache; the cheap
    ops (grayscale, flip) stay selects that fuse into the passes around them. Solarize is a
    cond too: fused, it would land in the last pass, which writes the planar result into the
    [S, S, C] output and so loops over 3 channels innermost, where XLA:CPU cannot vectorise;
    there every op costs scalar time (bench/RESULTS.md, session 10).
Both schedules compute the same numbers (tested). Single-channel images (Fashion-MNIST) are
supported: saturation, hue and grayscale have no meaning there and are no-ops.

This module imports neither TensorFlow nor clu: it runs on machines that have only jax.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp

from mocojax.data import recipes

# ITU-R 601-2 luma, the weights torchvision's rgb_to_grayscale uses.
_LUMA = (0.299, 0.587, 0.114)

# Uniforms each op consumes, and their layout in one view's row:
# [jitter (apply, 4 for the order, 4 factors) | gray | blur (apply, sigma) | solarize | flip].
JITTER_UNIFORMS = 9
_G = JITTER_UNIFORMS
_B = _G + 1
_S = _B + 2
_F = _S + 1
VIEW_UNIFORMS = _F + 1

# The key stream of the device-side augmentation (distinct from the host's crop stream).
_STREAM = 0x70686F  # 'pho'


def _lerp(u, low, high):
  return low + u * (high - low)


def example_uniforms(seed: int, step, row, shape: Sequence[int]):
  """Uniforms [B, *shape] for examples at (step [B], global row [B]) of the stream of `seed`.

  One key per example, folded from (seed, stream, step, row): a row's draw does not depend on
  the batch it sits in, so any sharding or host split gives the same numbers.
  """
  base = jax.random.fold_in(jax.random.key(seed), _STREAM)

  def one(s, r):
    key = jax.random.fold_in(jax.random.fold_in(base, s), r)
    return jax.random.uniform(key, tuple(shape), jnp.float32)

  return jax.vmap(one)(jnp.asarray(step, jnp.uint32), jnp.asarray(row, jnp.uint32))


# --------------------------------------------------------------------------------- colour
# The ops take one planar image [C, H, W] (channel outermost: every op is then a loop over long
# contiguous rows, which XLA vectorises; with C = 3 innermost it cannot) and its uniforms u.
def _maybe(apply, fn, x):
  """fn(x) if apply else x, for costly fn: a real branch per image, a select under vmap."""
  return jax.lax.cond(apply, fn, lambda y: y, x)


def _select(apply, fn, x):
  """fn(x) if apply else x, for cheap elementwise fn: a select that XLA fuses with the ops
  around it (a branch would cost a pass over the image of its own)."""
  return jnp.where(apply, fn(x), x)


def grayscale(x):
  """Luma [1, H, W] of an RGB image."""
  return _LUMA[0] * x[0:1] + _LUMA[1] * x[1:2] + _LUMA[2] * x[2:3]


def _blend(x, ref, factor):
  # torchvision's _blend: clamp(f x + (1 - f) ref).
  return jnp.clip(factor * x + (1.0 - factor) * ref, 0.0, 1.0)


def _frac(x):
  return x - jnp.floor(x)  # x mod 1 (jnp.mod becomes a scalar libm call per element)


def adjust_hue(x, delta):
  """Rotates the hue by delta (a fraction of the circle, torchvision's hue_factor) in HSV."""
  r, g, b = x[0], x[1], x[2]
  # The sector is chosen by comparisons, and v selected by the same ones, never by testing
  # v == r: XLA may recompute r inside a fusion with different rounding, and an equality test
  # would then pick the wrong sector's formula (a jump of up to a whole hue turn).
  r_max = (r >= g) & (r >= b)
  g_max = ~r_max & (g >= b)
  v = jnp.where(r_max, r, jnp.where(g_max, g, b))
  span = v - jnp.minimum(jnp.minimum(r, g), b)
  inv_span = 1.0 / jnp.where(span > 0, span, 1.0)
  s = span / jnp.where(v > 0, v, 1.0)
  rc, gc, bc = (v - r) * inv_span, (v - g) * inv_span, (v - b) * inv_span
  h = jnp.where(r_max, bc - gc, jnp.where(g_max, 2.0 + rc - bc, 4.0 + gc - rc))
  h = jnp.where(span > 0, _frac(h / 6.0), 0.0)
  h6 = 6.0 * _frac(h + delta)

  # HSV -> RGB, each channel as v - v s clip(min(k, 4 - k), 0, 1) with k = (n + 6h) mod 6: the
  # closed form of the six-sector table.
  def channel(n):
    k = n + h6
    k = jnp.where(k >= 6.0, k - 6.0, k)
    return v - v * s * jnp.clip(jnp.minimum(k, 4.0 - k), 0.0, 1.0)
  return jnp.stack([channel(5.0), channel(3.0), channel(1.0)])


def color_jitter(x, u, brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1, p: float = 1.0):
  """torchvision ColorJitter in RandomApply(p); u [9] = (apply, 4 order keys, 4 factors).

  Factors ~ U[max(0, 1 - s), 1 + s], hue ~ U[-h, h]; the four ops run in a random order (the
  argsort of the order keys), each clamped to [0, 1] as torchvision. Ops of strength 0 are
  skipped, and so are saturation and hue on one channel.
  """
  if p <= 0.0:
    return x
  colour = x.shape[0] == 3
  factor = lambda i, s: _lerp(u[5 + i], max(0.0, 1 - s), 1 + s)
  luma = grayscale if colour else (lambda y: y)
  ops = [lambda y: y] * 4
  if brightness:
    ops[0] = lambda y: _blend(y, 0.0, factor(0, brightness))
  if contrast:
    # torchvision blends with the mean of the grayscale image.
    ops[1] = lambda y: _blend(y, jnp.mean(luma(y)), factor(1, contrast))
  if saturation and colour:
    ops[2] = lambda y: _blend(y, grayscale(y), factor(2, saturation))
  if hue and colour:
    ops[3] = lambda y: adjust_hue(y, _lerp(u[8], -hue, hue))
  order = jnp.argsort(u[1:5])

  def jitter(y):
    for position in range(4):
      y = jax.lax.switch(order[position], ops, y)
    return y
  return _maybe(u[0] < p, jitter, x)


def random_grayscale(x, u, p: float = 0.2):
  """RandomGrayscale: luma copied to every channel with probability p; u [1]."""
  if x.shape[0] == 1 or p <= 0.0:
    return x
  return _select(u[0] < p, lambda y: jnp.broadcast_to(grayscale(y), y.shape), x)


def solarize(x, u, p: float = 0.2, threshold: float = 0.5):
  """RandomSolarize: pixels >= threshold inverted with probability p; u [1]."""
  if p <= 0.0:
    return x
  # A branch, not a select, though cheap: see the module docstring.
  return _maybe(u[0] < p, lambda y: jnp.where(y >= threshold, 1.0 - y, y), x)


def random_flip(x, u):
  """Horizontal flip with probability 1/2; u [1]."""
  return _select(u[0] < 0.5, lambda y: y[..., ::-1], x)


def normalize(x, mean: Sequence[float], std: Sequence[float], channel_axis: int = -3):
  """(x - mean) / std per channel; channels on `channel_axis` (planar [C, H, W] by default)."""
  shape = [1] * (-channel_axis)
  shape[0] = -1
  mean = jnp.reshape(jnp.asarray(mean, jnp.float32), shape)
  std = jnp.reshape(jnp.asarray(std, jnp.float32), shape)
  return (x - mean) / std


# ----------------------------------------------------------------------------------- blur
def blur_kernel_size(sigma_max: float, image_size: int) -> int:
  """Odd kernel size covering +-3 sigma_max, capped so reflect padding fits in the image.

  The MoCo v2/v3 reference blurs with PIL's GaussianBlur(radius=sigma), which has no kernel
  size (it approximates the whole Gaussian); +-3 sigma holds 99.7% of its mass, and a wider
  kernel (torchvision's 23 at 224 px) only adds taps below 1e-3.
  """
  k = max(2 * math.ceil(3 * sigma_max) + 1, 3)
  k = min(k, 2 * image_size - 1)
  return k if k % 2 == 1 else k - 1


def _blur_axis(x, taps, axis: int):
  """Convolves [C, H, W] along `axis` with taps [K], reflect padding (torchvision's and PIL's:
  the edge pixel is not repeated), as a sum of K shifted copies that XLA fuses into one loop."""
  r = taps.shape[0] // 2
  pad = [(0, 0)] * 3
  pad[axis] = (r, r)
  padded = jnp.pad(x, pad, mode='reflect')
  n = x.shape[axis]
  out = 0.0
  for t in range(taps.shape[0]):
    out = out + taps[t] * jax.lax.slice_in_dim(padded, t, t + n, axis=axis)
  return out


def gaussian_blur(x, u, p: float = 0.5, sigma=(0.1, 2.0), kernel_size: int | None = None):
  """GaussianBlur, sigma ~ U[sigma] pixels, applied with probability p; u [2], square images."""
  if p <= 0.0:
    return x
  size = x.shape[1]
  if x.shape[2] != size:
    raise ValueError(f'gaussian_blur takes square crops, got {x.shape[1:]}.')
  if kernel_size is None:
    kernel_size = blur_kernel_size(float(sigma[1]), size)
  if kernel_size // 2 >= size:
    raise ValueError(f'blur kernel {kernel_size} too wide for {size} px.')
  offsets = jnp.arange(kernel_size, dtype=jnp.float32) - kernel_size // 2
  taps = jnp.exp(-0.5 * jnp.square(offsets / _lerp(u[1], sigma[0], sigma[1])))
  taps = taps / jnp.sum(taps)

  # One branch per pass: a branch's result is materialised, where a fused pass 2 would
  # recompute pass 1 at each of its K taps.
  apply = u[0] < p
  x = _maybe(apply, lambda y: _blur_axis(y, taps, 1), x)
  return _maybe(apply, lambda y: _blur_axis(y, taps, 2), x)


# -------------------------------------------------------------------------------- recipes
def finish_view(image, u, spec: recipes.ViewSpec):
  """Everything after the crop, in torchvision's order, for one uint8 crop [S, S, C];
  u [VIEW_UNIFORMS]. Returns float32 [C, S, S] in [0, 1]."""
  x = jnp.transpose(image, (2, 0, 1)).astype(jnp.float32) / 255.0
  jitter = lambda y: color_jitter(y, u[:_G], *spec.jitter, p=spec.jitter_p)
  gray = lambda y: random_grayscale(y, u[_G:_B], spec.grayscale_p)
  x = jitter(gray(x)) if spec.grayscale_first else gray(jitter(x))
  x = gaussian_blur(x, u[_B:_S], spec.blur_p, spec.blur_sigma, spec.blur_kernel_size)
  x = solarize(x, u[_S:_F], spec.solarize_p)
  if spec.flip:
    x = random_flip(x, u[_F:])
  return x


def over_batch(fn, args, per_image: bool | None = None):
  """fn (one example's args -> one result) over the leading axis of args: vmapped, or mapped
  one example at a time (`per_image`; default: on CPUs, see the module docstring)."""
  if per_image is None:
    per_image = jax.default_backend() == 'cpu'
  return jax.lax.map(lambda a: fn(*a), args) if per_image else jax.vmap(fn)(*args)


def per_shard(fn, sharding):
  """fn (rows independent) jitted to run on each device's own rows of batches laid out by
  `sharding` (a NamedSharding of the leading axis), so per-image loops stay local.

  On CPUs it is compiled for 512-bit vectors where the CPU has them (XLA:CPU prefers 256 by
  default): the per-image passes are plain float loops, and the device half costs ~7% less
  CPU time on AVX-512 machines (bench/RESULTS.md, session 10); elsewhere it changes nothing.
  """
  if isinstance(sharding, jax.sharding.NamedSharding):
    platform = sharding.mesh.devices.flat[0].platform
    fn = jax.shard_map(fn, mesh=sharding.mesh, in_specs=sharding.spec, out_specs=sharding.spec)
  else:
    platform = jax.default_backend()
  options = {'xla_cpu_prefer_vector_width': 512} if platform == 'cpu' else None
  return jax.jit(fn, compiler_options=options)


def two_views(batch, *, specs, seed: int, mean, std, per_image: bool | None = None):
  """{'view1', 'view2' uint8 [B, S, S, C], 'step', 'row', ...} -> the same without step and row,
  the views normalised float32 [B, S, S, C].

  The device half of the two-view pipeline (`pipeline.train_dataset` is the host half). 'step'
  and 'row' (each example's global step and row in the global batch) key its draws.
  """
  u = example_uniforms(seed, batch['step'], batch['row'], (2, VIEW_UNIFORMS))

  def one(view1, view2, u):
    return tuple(jnp.transpose(normalize(finish_view(image, u[v], specs[v]), mean, std),
                               (1, 2, 0)) for v, image in enumerate((view1, view2)))

  view1, view2 = over_batch(one, (batch['view1'], batch['view2'], u), per_image)
  out = {k: v for k, v in batch.items() if k not in ('step', 'row')}
  return dict(out, view1=view1, view2=view2)


def images(batch, *, mean, std):
  """{'image' uint8 [B, S, S, C], ...} -> the same with the image normalised float32."""
  x = batch['image'].astype(jnp.float32) / 255.0
  return dict(batch, image=normalize(x, mean, std, channel_axis=-1))
