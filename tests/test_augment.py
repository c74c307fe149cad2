"""Host-side crops: torchvision's RandomResizedCrop windows, PIL's resize, uint8 out."""

import numpy as np
import pytest
import tensorflow as tf

from mocojax.data import augment

N_DRAWS = 1000


def _image(hw=16, channels=3, seed=0):
  rng = np.random.default_rng(seed)
  return tf.constant(rng.integers(0, 256, (hw, hw, channels)), tf.uint8)


def _seed(i):
  return tf.constant([i, 1234], tf.int32)


def _map_over_seeds(fn, n=N_DRAWS):
  """fn(seed) for seeds 0..n-1 inside a tf.data map, stacked."""
  ds = tf.data.Dataset.range(n).map(
      lambda i: fn(tf.stack([tf.cast(i, tf.int32), 1234])),
      num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  return next(iter(ds.batch(n))).numpy()


@pytest.mark.parametrize('channels', [1, 3])
@pytest.mark.parametrize('size', [8, 12, 24])  # down-, mixed- and up-scaling of 16 px
def test_crop_eager_and_in_map_agree_and_are_uint8(channels, size):
  image = _image(channels=channels)
  op = lambda s: augment.random_resized_crop(
      image, tf.random.stateless_uniform([augment.CROP_UNIFORMS], s), size)
  in_map = _map_over_seeds(op, n=8)
  assert in_map.shape == (8, size, size, channels) and in_map.dtype == np.uint8
  for i in (0, 5):
    eager = op(_seed(i)).numpy()
    np.testing.assert_array_equal(eager, in_map[i])
  assert not np.array_equal(in_map[0], in_map[1])


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


def test_crop_resizes_with_antialiasing_like_pil():
  """Downscaling averages (antialiasing); upscaling is bilinear, for which the cheaper
  non-antialiased kernel is used: both match tf.image.resize(antialias=True)."""
  image = _image(hw=40)
  for h, w, size in ((40, 40, 10), (10, 12, 30), (30, 8, 16)):
    out = augment.resized_crop(image, 3 if h < 40 else 0, 5 if w < 40 else 0, h, w, size)
    crop = tf.cast(image, tf.float32)[3 if h < 40 else 0:, 5 if w < 40 else 0:][:h, :w]
    want = tf.image.resize(crop, [size, size], antialias=True).numpy()
    got = out.numpy().astype(np.float32)
    assert np.abs(got - want).max() <= 0.5 + 1e-3  # rounded to the nearest grey level
  # A checkerboard downscaled 4x with antialiasing is flat grey, not aliased.
  board = tf.constant(np.kron(np.indices((16, 16)).sum(0) % 2, np.ones((1, 1)))[..., None] *
                      255, tf.uint8)
  flat = augment.resized_crop(board, 0, 0, 16, 16, 4).numpy()
  assert np.abs(flat.astype(int) - 128).max() <= 1


def test_batched_crop_matches_per_example_crop():
  """The matmul crop used per step equals slice + tf.image.resize to a grey level."""
  images = tf.stack([_image(hw=20, seed=i) for i in range(16)])
  u = tf.random.stateless_uniform([16, augment.CROP_UNIFORMS], [0, 1])
  for size in (12, 20, 32):  # down-, same- and up-scaling
    batched = augment.random_resized_crop_batch(images, u, size, (0.08, 1.0)).numpy()
    for i in range(16):
      single = augment.random_resized_crop(images[i], u[i], size, (0.08, 1.0)).numpy()
      assert np.abs(batched[i].astype(int) - single.astype(int)).max() <= 1


def test_resize_shorter_and_center_crop():
  image = _image(hw=20)[:, :16]  # 20 x 16
  out = augment.resize_shorter(image, 8)
  assert out.shape == (10, 8, 3) and out.dtype == tf.uint8
  assert augment.center_crop(out, 8).shape == (8, 8, 3)
