"""Augmentation ops: semantics, bounds, firing rates and determinism."""

import math

import numpy as np
import pytest
import tensorflow as tf

from mocojax.data import augment

N_DRAWS = 1000


def _image(hw=16, channels=3, low=0.0, high=1.0, seed=0):
  rng = np.random.default_rng(seed)
  return tf.constant(rng.uniform(low, high, (hw, hw, channels)), tf.float32)


def _seed(i):
  return tf.constant([i, 1234], tf.int32)


def _map_over_seeds(fn, n=N_DRAWS):
  """fn(seed) for seeds 0..n-1 inside a tf.data map, stacked."""
  ds = tf.data.Dataset.range(n).map(
      lambda i: fn(tf.stack([tf.cast(i, tf.int32), 1234])),
      num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  return next(iter(ds.batch(n))).numpy()


def _assert_rate(fired, p):
  fired = np.asarray(fired, bool)
  n = fired.size
  tol = 3 * math.sqrt(p * (1 - p) / n)
  assert abs(fired.mean() - p) <= tol, (fired.mean(), p, tol)


OPS = {
    'crop': lambda x, s: augment.random_resized_crop(x, s, 12),
    'jitter': lambda x, s: augment.color_jitter(x, s, 0.4, 0.4, 0.4, 0.1),
    'grayscale': lambda x, s: augment.random_grayscale(x, s, 0.5),
    'blur': lambda x, s: augment.gaussian_blur(x, s, 0.5),
    'solarize': lambda x, s: augment.solarize(x, s, 0.5),
    'flip': augment.random_flip,
}


@pytest.mark.parametrize('channels', [1, 3])
@pytest.mark.parametrize('name', sorted(OPS))
def test_op_eager_and_in_map_agree_and_stay_in_range(name, channels):
  op = OPS[name]
  image = _image(channels=channels)
  in_map = _map_over_seeds(lambda s: op(image, s), n=8)
  hw = 12 if name == 'crop' else 16
  assert in_map.shape == (8, hw, hw, channels)
  assert in_map.min() >= 0.0 and in_map.max() <= 1.0
  for i in (0, 5):
    eager = op(image, _seed(i)).numpy()
    np.testing.assert_allclose(eager, in_map[i], atol=1e-6)
    np.testing.assert_array_equal(eager, op(image, _seed(i)).numpy())


def test_crop_windows_respect_scale_and_ratio():
  scale, ratio = (0.08, 1.0), (3 / 4, 4 / 3)
  boxes = _map_over_seeds(
      lambda s: tf.stack(augment.crop_window(s, 224, 224, scale, ratio)))
  top, left, h, w = boxes.T
  assert (top >= 0).all() and (left >= 0).all()
  assert (top + h <= 224).all() and (left + w <= 224).all()
  area = h * w / 224**2
  # Sides are rounded to whole pixels, hence the small slack.
  assert area.min() >= scale[0] * 0.95 and area.max() <= 1.0
  aspect = w / h
  assert aspect.min() >= ratio[0] * 0.97 and aspect.max() <= ratio[1] * 1.03
  # Log-uniform aspect: about as many wide as tall crops, both ends reached.
  assert 0.4 < (aspect > 1).mean() < 0.6
  assert aspect.min() < 0.8 and aspect.max() > 1.25
  assert area.min() < 0.15 and area.max() > 0.9


def test_crop_falls_back_to_centre_crop_when_nothing_fits():
  # A 10x100 strip cannot hold a 3/4..4/3 crop of >= 50% area.
  top, left, h, w = (int(v) for v in augment.crop_window(
      _seed(0), 10, 100, scale=(0.5, 1.0)))
  assert (h, w) == (10, round(10 * 4 / 3))
  assert top == 0 and left == (100 - w) // 2


def test_crop_scale_is_configurable():
  boxes = _map_over_seeds(
      lambda s: tf.stack(augment.crop_window(s, 28, 28, (0.5, 0.6))), 200)
  area = boxes[:, 2] * boxes[:, 3] / 28**2
  assert area.min() >= 0.45 and area.max() <= 0.66


@pytest.mark.parametrize('name,p', [('jitter', 0.8), ('grayscale', 0.2),
                                    ('blur', 0.5), ('solarize', 0.2),
                                    ('flip', 0.5)])
def test_probabilistic_ops_fire_at_rate_p(name, p):
  image = _image(low=0.55)  # all pixels above the solarize threshold
  ops = {
      'jitter': lambda s: augment.color_jitter(image, s, 0.4, 0.4, 0.4, 0.1,
                                               p=p),
      'grayscale': lambda s: augment.random_grayscale(image, s, p),
      # sigma >= 1 so that every blur is visible (0.1 is a no-op in float32).
      'blur': lambda s: augment.gaussian_blur(image, s, p, sigma=(1.0, 2.0)),
      'solarize': lambda s: augment.solarize(image, s, p),
      'flip': lambda s: augment.random_flip(image, s),
  }
  out = _map_over_seeds(ops[name])
  fired = np.abs(out - image.numpy()).max(axis=(1, 2, 3)) > 1e-6
  _assert_rate(fired, p)


def test_grayscale_gives_equal_channels_with_luma_weights():
  image = _image()
  out = augment.random_grayscale(image, _seed(0), p=1.0).numpy()
  np.testing.assert_array_equal(out[..., 0], out[..., 1])
  np.testing.assert_array_equal(out[..., 0], out[..., 2])
  luma = image.numpy() @ np.array([0.299, 0.587, 0.114], np.float32)
  np.testing.assert_allclose(out[..., 0], luma, atol=1e-6)


def test_single_channel_noops():
  image = _image(channels=1)
  np.testing.assert_array_equal(
      augment.random_grayscale(image, _seed(0), p=1.0), image)
  only_colour = augment.color_jitter(image, _seed(0), 0.0, 0.0, 0.9, 0.5)
  np.testing.assert_allclose(only_colour, image, atol=1e-6)


def test_solarize_inverts_exactly_pixels_at_or_above_threshold():
  values = np.linspace(0, 1, 21, dtype=np.float32)  # contains 0.5 exactly
  image = tf.constant(values.reshape(1, 21, 1))
  out = augment.solarize(image, _seed(0), p=1.0).numpy().ravel()
  high = values >= 0.5
  np.testing.assert_array_equal(out[high], 1 - values[high])
  np.testing.assert_array_equal(out[~high], values[~high])


def test_blur_with_tiny_sigma_is_identity_and_large_sigma_smooths():
  image = _image()
  out = augment.gaussian_blur(image, _seed(0), p=1.0, sigma=(1e-4, 1e-4))
  np.testing.assert_allclose(out, image, atol=1e-6)
  smooth = augment.gaussian_blur(image, _seed(0), p=1.0, sigma=(2.0, 2.0))
  assert np.std(smooth) < 0.5 * np.std(image)


def test_blur_kernel_scales_with_size_and_covers_sigma():
  assert augment.blur_kernel_size(224, 2.0) == 23  # torchvision's choice
  assert augment.blur_kernel_size(28, 2.0) == 13  # +-3 sigma
  assert augment.blur_kernel_size(28, 0.25) == 3
  assert augment.blur_kernel_size(4, 2.0) == 7  # reflect pad < size
  for size in (8, 28, 96, 224):
    assert augment.blur_kernel_size(size, 2.0) % 2 == 1


def test_color_jitter_brightness_factor_range():
  image = tf.fill([4, 4, 3], 0.5)
  out = _map_over_seeds(
      lambda s: augment.color_jitter(image, s, 0.4, 0.0, 0.0, 0.0), 200)
  factors = out[:, 0, 0, 0] / 0.5
  assert factors.min() >= 0.6 - 1e-5 and factors.max() <= 1.4 + 1e-5
  assert factors.min() < 0.65 and factors.max() > 1.35


def test_recipes_match_the_papers():
  v1a, v1b = augment.view_specs('mocov1')
  assert v1a == v1b and v1a.grayscale_first and v1a.jitter_p == 1.0
  assert v1a.jitter == (0.4, 0.4, 0.4, 0.4) and v1a.crop_scale == (0.2, 1.0)
  v2a, v2b = augment.view_specs('mocov2')
  assert v2a == v2b and v2a.blur_p == 0.5 and v2a.jitter == (0.4, 0.4, 0.4,
                                                              0.1)
  v3a, v3b = augment.view_specs('mocov3', crop_scale=(0.3, 1.0))
  assert (v3a.blur_p, v3a.solarize_p) == (1.0, 0.0)
  assert (v3b.blur_p, v3b.solarize_p) == (0.1, 0.2)
  assert v3a.crop_scale == v3b.crop_scale == (0.3, 1.0)
  with pytest.raises(TypeError, match='Unknown augmentation overrides'):
    augment.view_specs('mocov3', blurr_p=0.3)


def test_mocov3_views_differ_in_blur_and_solarize_rates():
  # Everything but blur and solarize switched off, so each can be detected:
  # pixels all >= 0.55 flip below 0.5 when solarized, blur cuts variation.
  view1, view2 = augment.two_views(
      'mocov3', image_size=16, mean=[0.0], std=[1.0], crop_scale=(1.0, 1.0),
      crop_ratio=(1.0, 1.0), jitter_p=0.0, grayscale_p=0.0, flip=False,
      blur_sigma=(1.0, 2.0))  # small sigmas are invisible
  image = tf.constant(np.random.default_rng(0).integers(
      141, 256, (16, 16, 1)), tf.uint8)
  base_tv = float(tf.image.total_variation(tf.cast(image, tf.float32) / 255))
  for view, blur_p, solarize_p in ((view1, 1.0, 0.0), (view2, 0.1, 0.2)):
    out = _map_over_seeds(lambda s, v=view: v(image, s))
    tv = np.abs(np.diff(out, axis=1)).sum((1, 2, 3)) + np.abs(
        np.diff(out, axis=2)).sum((1, 2, 3))
    blurred = tv < 0.9 * base_tv
    solarized = out.mean(axis=(1, 2, 3)) < 0.5
    if blur_p == 1.0:
      assert blurred.all()
    else:
      _assert_rate(blurred, blur_p)
    if solarize_p == 0.0:
      assert not solarized.any()
    else:
      _assert_rate(solarized, solarize_p)


@pytest.mark.parametrize('recipe', sorted(augment.RECIPES))
@pytest.mark.parametrize('channels', [1, 3])
def test_two_views_every_recipe(recipe, channels):
  mean, std = [0.5] * channels, [0.25] * channels
  view1, view2 = augment.two_views(recipe, image_size=12, mean=mean, std=std)
  image = tf.constant(np.random.default_rng(0).integers(
      0, 256, (28, 28, channels)), tf.uint8)
  a = view1(image, _seed(0)).numpy()
  assert a.shape == (12, 12, channels) and a.dtype == np.float32
  # Normalised values of [0, 1] pixels lie in [-2, 2] for mean/std .5/.25.
  assert a.min() >= -2 - 1e-5 and a.max() <= 2 + 1e-5
  np.testing.assert_array_equal(a, view1(image, _seed(0)).numpy())
  assert not np.array_equal(a, view1(image, _seed(1)).numpy())
  assert view2(image, _seed(0)).shape == (12, 12, channels)


def test_normalize():
  out = augment.normalize(tf.fill([2, 2, 3], 0.5), [0.5, 0.25, 0.0],
                          [0.5, 0.25, 0.5])
  np.testing.assert_allclose(out[0, 0], [0.0, 1.0, 1.0])


# ------------------------------------------- batched forms vs. references


def test_batched_crop_matches_tf_image_resize():
  """The matmul crop used per step equals slice + tf.image.resize."""
  images = tf.stack([_image(hw=20, seed=i) for i in range(16)])
  u = tf.random.stateless_uniform([16, augment.CROP_UNIFORMS], [0, 1])
  for size in (12, 20, 32):  # down-, same- and up-scaling
    batched = augment.random_resized_crop_batch(images, u, size, (0.08, 1.0))
    for i in range(16):
      single = augment.random_resized_crop_from_uniforms(
          images[i], u[i], size, (0.08, 1.0))
      np.testing.assert_allclose(batched[i], single, atol=2e-5)


def _reference_blur(image, sigma, kernel_size):
  """Depthwise convolution with reflect padding, as torchvision does."""
  r = kernel_size // 2
  x = tf.range(-r, r + 1, dtype=tf.float32)
  k = tf.exp(-0.5 * tf.square(x / sigma))
  k = k / tf.reduce_sum(k)
  c = image.shape[-1]
  kx = tf.tile(tf.reshape(k, [1, -1, 1, 1]), [1, 1, c, 1])
  ky = tf.reshape(kx, [-1, 1, c, 1])
  padded = tf.pad(image[None], [[0, 0], [r, r], [r, r], [0, 0]], 'REFLECT')
  out = tf.nn.depthwise_conv2d(padded, kx, [1] * 4, 'VALID')
  return tf.nn.depthwise_conv2d(out, ky, [1] * 4, 'VALID')[0]


@pytest.mark.parametrize('size,sigma', [(28, 2.0), (16, 0.7), (5, 1.5)])
def test_blur_matches_reflect_padded_convolution(size, sigma):
  image = _image(hw=size)
  k = augment.blur_kernel_size(size, sigma)
  out = augment.gaussian_blur(image, _seed(0), p=1.0, sigma=(sigma, sigma))
  np.testing.assert_allclose(out, _reference_blur(image, sigma, k),
                             atol=1e-5)


def _reference_jitter(image, u, strengths):
  """torchvision ColorJitter.forward, one image, from the same uniforms."""
  b, c, s, h = strengths
  gray = lambda y: tf.reduce_sum(y * [0.299, 0.587, 0.114], -1, True)
  ops = [
      lambda y: tf.clip_by_value(y * (1 - b + 2 * b * u[5]), 0, 1),
      lambda y: tf.clip_by_value(
          (1 - c + 2 * c * u[6]) * y +
          (c - 2 * c * u[6]) * tf.reduce_mean(gray(y)), 0, 1),
      lambda y: tf.clip_by_value(
          (1 - s + 2 * s * u[7]) * y + (s - 2 * s * u[7]) * gray(y), 0, 1),
      lambda y: tf.image.adjust_hue(y, -h + 2 * h * u[8]),
  ]
  for k in np.argsort(u[1:5]):
    image = ops[k](image)
  return image


def test_color_jitter_matches_torchvision_definition():
  strengths = (0.4, 0.4, 0.4, 0.1)
  for i in range(12):
    image = _image(seed=i)
    u = tf.random.stateless_uniform([augment.JITTER_UNIFORMS], _seed(i))
    out = augment.color_jitter_batch(image[None], u[None], *strengths)[0]
    expected = _reference_jitter(image, u.numpy(), strengths)
    np.testing.assert_allclose(out, expected, atol=1e-4)
    np.testing.assert_array_equal(
        out, augment.color_jitter(image, _seed(i), *strengths))
