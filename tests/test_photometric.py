"""Device-side augmentations: torchvision semantics, firing rates, keys, and the CPU schedule
(image by image, real branches) equal to the accelerator one (vmapped, selects)."""

import colorsys
import functools
import math

import jax
import numpy as np
import pytest

from mocojax.data import photometric as P
from mocojax.data import recipes

N_DRAWS = 1000


def _images(n, hw=16, channels=3, low=0.0, high=1.0, seed=0):
  """Planar float images [n, C, H, W]."""
  return np.random.default_rng(seed).uniform(low, high, (n, channels, hw, hw)).astype(np.float32)


def _uniforms(n, k, seed=0):
  return np.asarray(P.example_uniforms(seed, np.zeros(n, np.int32), np.arange(n), (k,)))


def _both(fn, x, u):
  """fn over a batch in both schedules; asserts they agree and returns the result."""
  mapped = np.asarray(jax.jit(lambda x, u: P.over_batch(fn, (x, u), True))(x, u))
  vmapped = np.asarray(jax.jit(lambda x, u: P.over_batch(fn, (x, u), False))(x, u))
  np.testing.assert_allclose(mapped, vmapped, atol=2e-6)
  return mapped


def _assert_rate(fired, p):
  fired = np.asarray(fired, bool)
  tol = 3 * math.sqrt(p * (1 - p) / fired.size)
  assert abs(fired.mean() - p) <= tol, (fired.mean(), p, tol)


@pytest.mark.parametrize('name,p', [('jitter', 0.8), ('grayscale', 0.2), ('blur', 0.5),
                                    ('solarize', 0.2), ('flip', 0.5)])
def test_ops_fire_at_rate_p_and_stay_in_range(name, p):
  x = np.broadcast_to(_images(1, low=0.55)[0], (N_DRAWS, 3, 16, 16))  # all above 0.5
  ops = {
      'jitter': lambda x, u: P.color_jitter(x, u[:9], 0.4, 0.4, 0.4, 0.1, p=p),
      'grayscale': lambda x, u: P.random_grayscale(x, u[:1], p),
      # sigma >= 1 so that every blur is visible.
      'blur': lambda x, u: P.gaussian_blur(x, u[:2], p, sigma=(1.0, 2.0)),
      'solarize': lambda x, u: P.solarize(x, u[:1], p),
      'flip': lambda x, u: P.random_flip(x, u[:1]),
  }
  out = _both(ops[name], x, _uniforms(N_DRAWS, 9))
  assert out.min() >= 0.0 and out.max() <= 1.0
  _assert_rate(np.abs(out - x).max(axis=(1, 2, 3)) > 1e-6, p)


def test_grayscale_gives_equal_channels_with_luma_weights():
  x = _images(2)
  out = _both(lambda x, u: P.random_grayscale(x, u, 1.0), x, _uniforms(2, 1))
  luma = np.einsum('nchw,c->nhw', x, [0.299, 0.587, 0.114])
  for c in range(3):
    np.testing.assert_allclose(out[:, c], luma, atol=1e-6)


def test_single_channel_noops():
  x = _images(4, channels=1)
  u = _uniforms(4, 9)
  np.testing.assert_array_equal(_both(lambda x, u: P.random_grayscale(x, u, 1.0), x, u), x)
  only_colour = _both(lambda x, u: P.color_jitter(x, u, 0.0, 0.0, 0.9, 0.5), x, u)
  np.testing.assert_allclose(only_colour, x, atol=1e-6)


def test_solarize_inverts_exactly_pixels_at_or_above_threshold():
  values = np.linspace(0, 1, 21, dtype=np.float32)  # contains 0.5 exactly
  x = values.reshape(1, 1, 1, 21)
  out = _both(lambda x, u: P.solarize(x, u, p=1.0), x, _uniforms(1, 1)).ravel()
  high = values >= 0.5
  np.testing.assert_array_equal(out[high], 1 - values[high])
  np.testing.assert_array_equal(out[~high], values[~high])


def test_flip_mirrors_columns():
  x = _images(64)
  u = _uniforms(64, 1)
  out = _both(P.random_flip, x, u)
  for i in range(64):
    np.testing.assert_array_equal(out[i], x[i, :, :, ::-1] if u[i, 0] < 0.5 else x[i])


def _reference_blur(image, sigma, kernel_size):
  """Separable Gaussian with reflect padding (no repeated edge), in float64 numpy."""
  r = kernel_size // 2
  k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
  k /= k.sum()
  padded = np.pad(image.astype(np.float64), ((0, 0), (r, r), (r, r)), mode='reflect')
  h, w = image.shape[1:]
  rows = sum(k[t] * padded[:, t:t + h, :] for t in range(kernel_size))
  return sum(k[t] * rows[:, :, t:t + w] for t in range(kernel_size))


@pytest.mark.parametrize('size,sigma', [(28, 2.0), (16, 0.7), (5, 1.5), (224, 1.3)])
def test_blur_matches_reflect_padded_convolution(size, sigma):
  x = _images(1, hw=size)
  k = P.blur_kernel_size(sigma, size)
  out = _both(lambda x, u: P.gaussian_blur(x, u, p=1.0, sigma=(sigma, sigma)), x,
              _uniforms(1, 2))
  np.testing.assert_allclose(out[0], _reference_blur(x[0], sigma, k), atol=1e-5)


def test_blur_with_tiny_sigma_is_identity_and_large_sigma_smooths():
  x = _images(1)
  u = _uniforms(1, 2)
  out = _both(lambda x, u: P.gaussian_blur(x, u, p=1.0, sigma=(1e-4, 1e-4)), x, u)
  np.testing.assert_allclose(out, x, atol=1e-6)
  smooth = _both(lambda x, u: P.gaussian_blur(x, u, p=1.0, sigma=(2.0, 2.0)), x, u)
  assert np.std(smooth) < 0.5 * np.std(x)


def test_blur_kernel_covers_three_sigma_and_fits_the_image():
  assert P.blur_kernel_size(2.0, 224) == 13  # +-6 px: 99.7% of the Gaussian
  assert P.blur_kernel_size(1.0, 28) == 7
  assert P.blur_kernel_size(0.25, 28) == 3
  assert P.blur_kernel_size(2.0, 4) == 7  # reflect pad < size
  for size in (8, 28, 96, 224):
    assert P.blur_kernel_size(2.0, size) % 2 == 1


def _reference_jitter(image, u, strengths):
  """torchvision ColorJitter.forward for one [C, H, W] image from the same uniforms, with hue
  through Python's colorsys (float64)."""
  b, c, s, h = strengths
  gray = lambda y: np.tensordot([0.299, 0.587, 0.114], y, axes=1)[None]
  blend = lambda y, ref, f: np.clip(f * y + (1 - f) * ref, 0, 1)

  def hue(y, delta):
    flat = y.reshape(3, -1).T
    out = []
    for r, g, bl in flat:
      hh, ss, vv = colorsys.rgb_to_hsv(r, g, bl)
      out.append(colorsys.hsv_to_rgb((hh + delta) % 1.0, ss, vv))
    return np.asarray(out).T.reshape(y.shape)

  ops = [lambda y: blend(y, 0.0, 1 - b + 2 * b * u[5]),
         lambda y: blend(y, gray(y).mean(), 1 - c + 2 * c * u[6]),
         lambda y: blend(y, gray(y), 1 - s + 2 * s * u[7]),
         lambda y: hue(y, -h + 2 * h * u[8])]
  y = image.astype(np.float64)
  for k in np.argsort(u[1:5]):
    y = ops[k](y)
  return y


def test_color_jitter_matches_torchvision_definition():
  strengths = (0.4, 0.4, 0.4, 0.1)
  x = _images(12, hw=8)
  u = _uniforms(12, 9)
  out = _both(lambda x, u: P.color_jitter(x, u, *strengths), x, u)
  for i in range(12):
    np.testing.assert_allclose(out[i], _reference_jitter(x[i], u[i], strengths), atol=1e-5)


def test_hue_handles_ties_and_greys_like_colorsys():
  # Channel ties (two channels at the maximum) and greys are where a float equality test on
  # recomputed values picks the wrong hue sector.
  values = [(1, 1, 0), (0, 1, 1), (1, 0, 1), (0.5, 0.5, 0.5), (0, 0, 0), (1, 1, 1),
            (0.2, 0.9, 0.9), (0.9, 0.2, 0.9)]
  x = np.asarray(values, np.float32).T.reshape(1, 3, 1, len(values))
  for delta in (-0.1, 0.05, 0.5):
    out = np.asarray(jax.jit(P.adjust_hue)(x[0], delta))[:, 0].T
    for got, (r, g, b) in zip(out, values):
      hh, ss, vv = colorsys.rgb_to_hsv(r, g, b)
      np.testing.assert_allclose(got, colorsys.hsv_to_rgb((hh + delta) % 1.0, ss, vv),
                                 atol=1e-6)


def test_color_jitter_brightness_factor_range():
  x = np.full((200, 3, 4, 4), 0.5, np.float32)
  out = _both(lambda x, u: P.color_jitter(x, u, 0.4, 0.0, 0.0, 0.0), x, _uniforms(200, 9))
  factors = out[:, 0, 0, 0] / 0.5
  assert factors.min() >= 0.6 - 1e-5 and factors.max() <= 1.4 + 1e-5
  assert factors.min() < 0.65 and factors.max() > 1.35


def test_recipes_match_the_papers():
  v1a, v1b = recipes.view_specs('mocov1')
  assert v1a == v1b and v1a.grayscale_first and v1a.jitter_p == 1.0
  assert v1a.jitter == (0.4, 0.4, 0.4, 0.4) and v1a.crop_scale == (0.2, 1.0)
  v2a, v2b = recipes.view_specs('mocov2')
  assert v2a == v2b and v2a.blur_p == 0.5 and v2a.jitter == (0.4, 0.4, 0.4, 0.1)
  v3a, v3b = recipes.view_specs('mocov3', crop_scale=(0.3, 1.0))
  assert (v3a.blur_p, v3a.solarize_p) == (1.0, 0.0)
  assert (v3b.blur_p, v3b.solarize_p) == (0.1, 0.2)
  assert v3a.crop_scale == v3b.crop_scale == (0.3, 1.0)
  assert v3a.jitter == (0.4, 0.4, 0.2, 0.1) and v3a.jitter_p == 0.8
  with pytest.raises(TypeError, match='Unknown augmentation overrides'):
    recipes.view_specs('mocov3', blurr_p=0.3)


def _batch(n, size=16, channels=3, step=0, rows=None, seed=0):
  rng = np.random.default_rng(seed)
  return {'view1': rng.integers(0, 256, (n, size, size, channels), dtype=np.uint8),
          'view2': rng.integers(0, 256, (n, size, size, channels), dtype=np.uint8),
          'label': np.arange(n, dtype=np.int32), 'step': np.full(n, step, np.int32),
          'row': np.arange(n, dtype=np.int32) if rows is None else np.asarray(rows, np.int32)}


def _two_views(batch, recipe='mocov3', per_image=None, seed=0, channels=3, **overrides):
  specs = recipes.view_specs(recipe, **overrides)
  fn = functools.partial(P.two_views, specs=specs, seed=seed, mean=(0.5,) * channels,
                         std=(0.25,) * channels, per_image=per_image)
  return jax.tree.map(np.asarray, jax.jit(fn)(batch))


@pytest.mark.parametrize('recipe', sorted(recipes.RECIPES))
@pytest.mark.parametrize('channels', [1, 3])
def test_two_views_every_recipe_both_schedules(recipe, channels):
  batch = _batch(16, channels=channels)
  mapped = _two_views(batch, recipe, per_image=True, channels=channels)
  vmapped = _two_views(batch, recipe, per_image=False, channels=channels)
  assert set(mapped) == {'view1', 'view2', 'label'}
  for key in ('view1', 'view2'):
    assert mapped[key].shape == (16, 16, 16, channels) and mapped[key].dtype == np.float32
    # Normalised values of [0, 1] pixels lie in [-2, 2] for mean/std .5/.25.
    assert mapped[key].min() >= -2 - 1e-5 and mapped[key].max() <= 2 + 1e-5
    np.testing.assert_allclose(mapped[key], vmapped[key], atol=1e-5)
  assert not np.array_equal(mapped['view1'], _two_views(batch, recipe, seed=1,
                                                        channels=channels)['view1'])


def test_per_shard_compiles_with_its_cpu_options_and_matches_a_plain_jit():
  """per_shard's CPU compile options (512-bit vectors) leave the views as a plain jit gives
  them, to float32 rounding (sums such as the contrast mean run in another order: ~2e-6 here);
  a misspelt option would fail to compile."""
  from mocojax import parallel
  batch = _batch(8, size=32)
  fn = functools.partial(P.two_views, specs=recipes.view_specs('mocov3'), seed=0,
                         mean=(0.5,) * 3, std=(0.25,) * 3)
  sharding = parallel.batch_sharding(parallel.make_mesh())
  fast = P.per_shard(fn, sharding)(jax.device_put(batch, sharding))
  plain = jax.jit(fn)(batch)
  for key in ('view1', 'view2'):
    np.testing.assert_allclose(np.asarray(fast[key]), np.asarray(plain[key]), atol=1e-5)


def test_two_views_depend_on_seed_step_and_row_only():
  """An example's views are a function of (seed, step, row): the same row anywhere in any
  batch (another host's slice, another device's shard) is augmented the same way."""
  whole = _two_views(_batch(8, step=5))
  tail = _batch(8, step=5)
  tail = {k: v[4:] for k, v in tail.items()}  # rows 4..7 as their own batch
  part = _two_views(tail)
  for key in ('view1', 'view2'):
    np.testing.assert_allclose(whole[key][4:], part[key], atol=1e-6)
  other_step = _two_views(_batch(8, step=6))
  assert not np.allclose(whole['view1'], other_step['view1'])


def test_mocov3_views_differ_in_blur_and_solarize_rates():
  # Everything but blur and solarize switched off, so each can be detected: pixels all >= 141
  # flip below 128 when solarized, blur cuts the variation.
  rng = np.random.default_rng(0)
  image = rng.integers(141, 256, (16, 16, 1), dtype=np.uint8)
  batch = _batch(N_DRAWS, channels=1)
  batch['view1'] = batch['view2'] = np.broadcast_to(image, (N_DRAWS, 16, 16, 1))
  out = _two_views(batch, channels=1, jitter_p=0.0, grayscale_p=0.0, flip=False,
                   blur_sigma=(1.0, 2.0))
  base_tv = np.abs(np.diff(image / 255.0, axis=0)).sum() + np.abs(np.diff(image / 255.0,
                                                                          axis=1)).sum()
  for key, blur_p, solarize_p in (('view1', 1.0, 0.0), ('view2', 0.1, 0.2)):
    x = out[key] * 0.25 + 0.5
    tv = np.abs(np.diff(x, axis=1)).sum((1, 2, 3)) + np.abs(np.diff(x, axis=2)).sum((1, 2, 3))
    blurred = tv < 0.9 * base_tv
    solarized = x.mean(axis=(1, 2, 3)) < 0.5
    if blur_p == 1.0:
      assert blurred.all()
    else:
      _assert_rate(blurred, blur_p)
    if solarize_p == 0.0:
      assert not solarized.any()
    else:
      _assert_rate(solarized, solarize_p)


def test_images_normalises():
  batch = {'image': np.full((2, 2, 2, 3), 128, np.uint8), 'label': np.zeros(2, np.int32)}
  out = P.images(batch, mean=(0.5, 0.25, 0.0), std=(0.5, 0.25, 0.5))
  np.testing.assert_allclose(out['image'][0, 0, 0], [(128 / 255 - 0.5) / 0.5,
                                                     (128 / 255 - 0.25) / 0.25,
                                                     (128 / 255) / 0.5], atol=1e-6)
