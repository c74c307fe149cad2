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


def _pil_crop(image, top, left, h, w, size):
  """The reference's call: torchvision's resized_crop on a PIL image."""
  from PIL import Image
  pil = Image.fromarray(image.numpy().squeeze(-1) if image.shape[-1] == 1 else image.numpy())
  out = np.asarray(pil.crop((left, top, left + w, top + h)).resize((size, size), Image.BILINEAR))
  return out.reshape(size, size, -1)


@pytest.mark.parametrize('channels', [1, 3])
def test_crops_are_the_reference_pil_pixels(channels):
  """Both views of one image in one call, inside a tf.data map: PIL's pixels exactly, and
  tf.image.resize(antialias=True)'s to a grey level (the same filter; PIL rounds between its
  two passes)."""
  image = _image(hw=40, channels=channels)
  boxes = [(0, 0, 40, 40, 10), (3, 5, 10, 12, 30), (3, 5, 30, 8, 16), (7, 2, 33, 29, 24)]
  for size in (10, 16, 30):
    ds = tf.data.Dataset.from_tensors(image).map(
        lambda x: augment.resized_crops(x, tf.constant([b[:4] for b in boxes]), size))
    got = next(iter(ds)).numpy()
    assert got.shape == (len(boxes), size, size, channels) and got.dtype == np.uint8
    for v, (top, left, h, w, _) in enumerate(boxes):
      np.testing.assert_array_equal(got[v], _pil_crop(image, top, left, h, w, size))
      crop = tf.cast(image, tf.float32)[top:top + h, left:left + w]
      want = tf.image.resize(crop, [size, size], antialias=True).numpy()
      assert np.abs(got[v].astype(np.float32) - want).max() <= 1.0


def test_crop_never_reads_outside_its_window():
  """Crop, then resize (torchvision): the filter does not reach pixels past the window's edge,
  which PIL's resize(box=...) would."""
  image = np.full((40, 40, 3), 255, np.uint8)
  image[10:30, 5:25] = 0
  out = augment.resized_crops(tf.constant(image), tf.constant([[10, 5, 20, 20]]), 7).numpy()
  assert out.max() == 0


def test_crop_resizes_with_antialiasing():
  """A checkerboard downscaled 4x is flat grey, not aliased."""
  board = tf.constant(np.kron(np.indices((16, 16)).sum(0) % 2, np.ones((1, 1)))[..., None] *
                      255, tf.uint8)
  flat = augment.resized_crops(board, tf.constant([[0, 0, 16, 16]]), 4)[0].numpy()
  assert np.abs(flat.astype(int) - 128).max() <= 1


def test_batched_crop_matches_per_example_crop():
  """The matmul crop used per step (in-memory images) equals the per-example PIL crop to a grey
  level."""
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
  from PIL import Image
  want = np.asarray(Image.fromarray(image.numpy()).resize((8, 10), Image.BILINEAR))
  np.testing.assert_array_equal(out.numpy(), want)  # torchvision Resize(8) on PIL
  assert augment.center_crop(out, 8).shape == (8, 8, 3)
  batch = augment.resize_shorter(tf.stack([image, image[::-1]]), 8).numpy()
  np.testing.assert_array_equal(batch[0], out.numpy())
