"""Sources: real Fashion-MNIST IDX files, image folders, TFDS, arrays."""

import dataclasses
import gzip
import io
import os

import ml_collections
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from mocojax.data import pipeline, sources

FMNIST_DIR = '/usr/share/datasets/fashion-mnist'


def _config(**kw):
  base = dict(source='idx', name='fashion_mnist', data_dir=FMNIST_DIR,
              train_split='train', eval_split='test')
  base.update(kw)
  return ml_collections.ConfigDict(base)


def _lookup_in_map(source, indices):
  ds = tf.data.Dataset.from_tensor_slices(indices).map(source.lookup)
  return list(ds.as_numpy_iterator())


# ------------------------------------------------------------------- arrays

def test_from_arrays_lookup_eager_and_in_map():
  images = np.arange(5 * 2 * 3 * 1, dtype=np.uint8).reshape(5, 2, 3, 1)
  source = sources.Source.from_arrays(images, [4, 3, 2, 1, 0])
  assert (source.num_examples, source.num_classes) == (5, 5)
  assert source.image_shape == (2, 3, 1)
  example = source.lookup(tf.constant(1))
  np.testing.assert_array_equal(example['image'], images[1])
  assert example['label'].dtype == tf.int32 and int(example['label']) == 3
  (mapped,) = _lookup_in_map(source, [2])
  np.testing.assert_array_equal(mapped['image'], images[2])


def test_from_arrays_rejects_bad_input():
  with pytest.raises(ValueError, match='uint8'):
    sources.Source.from_arrays(np.zeros((2, 3, 3, 1), np.float32), [0, 1])
  with pytest.raises(ValueError, match='labels shape'):
    sources.Source.from_arrays(np.zeros((2, 3, 3, 1), np.uint8), [0])


def test_arrays_source_cannot_come_from_config():
  with pytest.raises(ValueError, match='from_arrays'):
    sources.get_source(_config(source='arrays'), 'train')
  with pytest.raises(ValueError, match='Unknown data.source'):
    sources.get_source(_config(source='zip'), 'train')


# ---------------------------------------------------------------------- IDX

def _write_idx(path, array):
  header = bytes([0, 0, 8, array.ndim]) + b''.join(
      d.to_bytes(4, 'big') for d in array.shape)
  opener = gzip.open if str(path).endswith('.gz') else open
  with opener(path, 'wb') as f:
    f.write(header + array.astype(np.uint8).tobytes())


@pytest.mark.parametrize('suffix', ['', '.gz'])
def test_read_idx_roundtrip(tmp_path, suffix):
  array = np.random.default_rng(0).integers(0, 256, (3, 4, 5))
  _write_idx(tmp_path / f'x{suffix}', array)
  np.testing.assert_array_equal(sources.read_idx(tmp_path / f'x{suffix}'),
                                array)


def test_idx_source_on_tiny_files(tmp_path):
  images = np.random.default_rng(0).integers(0, 256, (6, 28, 28))
  for prefix in ('train', 't10k'):
    _write_idx(tmp_path / f'{prefix}-images-idx3-ubyte.gz', images)
    _write_idx(tmp_path / f'{prefix}-labels-idx1-ubyte.gz',
               np.array([0, 1, 2, 0, 1, 2]))
  source = sources.get_source(_config(data_dir=str(tmp_path)), 'test')
  assert (source.num_examples, source.num_classes) == (6, 3)
  assert source.image_shape == (28, 28, 1)
  np.testing.assert_array_equal(source.lookup(3)['image'][..., 0], images[3])


def test_missing_idx_dir_raises_a_helpful_error(tmp_path):
  missing = tmp_path / 'nowhere'
  with pytest.raises(sources.DatasetNotFoundError) as err:
    sources.get_source(_config(data_dir=str(missing)), 'train')
  message = str(err.value)
  assert 'data.data_dir' in message
  assert str(missing / 'train-images-idx3-ubyte.gz') in message
  assert 'apt-get install dataset-fashion-mnist' in message


@pytest.mark.skipif(
    not os.path.exists(os.path.join(FMNIST_DIR, 'train-images-idx3-ubyte.gz')),
    reason=f'Fashion-MNIST IDX files not in {FMNIST_DIR} '
    '(apt-get install dataset-fashion-mnist)')
def test_real_fashion_mnist():
  train = sources.get_source(_config(), 'train')
  test = sources.get_source(_config(), 'test')
  assert (train.num_examples, test.num_examples) == (60000, 10000)
  assert train.num_classes == test.num_classes == 10
  assert train.image_shape == test.image_shape == (28, 28, 1)
  first = train.lookup(tf.constant(0))
  assert first['image'].dtype == tf.uint8
  assert first['image'].shape == (28, 28, 1)
  assert int(first['label']) == 9  # the first training image is an ankle boot
  (last,) = _lookup_in_map(test, [9999])
  assert 0 <= last['label'] < 10 and last['image'].max() > 0


# ------------------------------------------------------------ image folders

def _write_png(path, array):
  path.parent.mkdir(parents=True, exist_ok=True)
  tf.io.write_file(str(path), tf.io.encode_png(array))


def test_image_folder(tmp_path):
  rng = np.random.default_rng(0)
  written = {}
  for cls_name, sizes in (('dog', [(6, 8), (9, 5)]), ('cat', [(7, 7)])):
    for k, (h, w) in enumerate(sizes):
      array = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
      _write_png(tmp_path / 'train' / cls_name / f'{k}.png', array)
      written[(cls_name, k)] = array
  (tmp_path / 'train' / 'cat' / 'notes.txt').write_text('not an image')

  source = sources.get_source(_config(source='folder',
                                      data_dir=str(tmp_path)), 'train')
  assert (source.num_examples, source.num_classes) == (3, 2)
  assert source.image_shape == (None, None, 3)
  examples = _lookup_in_map(source, [0, 1, 2])
  # Classes are numbered in sorted order: cat=0, dog=1.
  assert [e['label'] for e in examples] == [0, 1, 1]
  np.testing.assert_array_equal(examples[0]['image'], written[('cat', 0)])
  np.testing.assert_array_equal(examples[2]['image'], written[('dog', 1)])

  # Variable-size images go through both pipelines.
  (batch,) = [b for b, _ in zip(pipeline.train_dataset(
      source, global_batch=2, seed=0, start_step=0, image_size=8,
      process_index=0, process_count=1).as_numpy_iterator(), range(1))]
  assert batch['view1'].shape == (2, 8, 8, 3)
  batches = list(pipeline.eval_dataset(
      source, global_batch=2, image_size=4, process_index=0,
      process_count=1).as_numpy_iterator())
  assert [b['mask'].tolist() for b in batches] == [[True, True],
                                                   [True, False]]


def test_jpegs_decode_to_the_pixels_pil_gives(tmp_path):
  """The reference code decodes with PIL (libjpeg's accurate IDCT); TF's default fast IDCT
  would differ by a few grey levels. Smooth content plus noise, as photographs have."""
  rng = np.random.default_rng(0)
  for k in range(4):
    h, w = rng.integers(40, 90, 2)
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    smooth = 127 + 80 * np.sin(2 * np.pi * (rng.uniform(1, 4) * x + rng.uniform(1, 4) * y))
    pixels = np.clip(smooth[..., None] + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
    (tmp_path / 'a').mkdir(exist_ok=True)
    Image.fromarray(pixels).save(tmp_path / 'a' / f'{k}.jpg', quality=90)
  source = sources.get_source(_config(source='folder', data_dir=str(tmp_path)), 'train')
  fast_differs = 0
  for k, example in enumerate(_lookup_in_map(source, list(range(4)))):
    path = str(tmp_path / 'a' / f'{k}.jpg')
    want = np.asarray(Image.open(path).convert('RGB'))
    np.testing.assert_array_equal(example['image'], want)
    fast = tf.io.decode_jpeg(tf.io.read_file(path), channels=3).numpy()
    fast_differs += int((fast != want).any())
  assert fast_differs > 0  # the check above can tell the two IDCTs apart


def _mixed_folder(root):
  """Images in every stored form the reference's loader meets in ImageNet: RGB, grayscale and
  CMYK JPEGs (of odd sizes, so crops hit chroma-subsampled edges), a PNG, a palette BMP."""
  rng = np.random.default_rng(1)
  (root / 'a').mkdir(parents=True)
  (root / 'b').mkdir()
  for k, (mode, ext, (h, w)) in enumerate([('RGB', 'jpg', (37, 51)), ('L', 'jpg', (44, 29)),
                                           ('CMYK', 'jpg', (31, 40)), ('RGB', 'png', (26, 33)),
                                           ('P', 'bmp', (30, 30)), ('RGB', 'jpeg', (57, 45))]):
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    smooth = 127 + 80 * np.sin(2 * np.pi * (rng.uniform(1, 4) * x + rng.uniform(1, 4) * y))
    pixels = np.clip(smooth[..., None] + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).convert(mode).save(root / 'ab'[k % 2] / f'{k}.{ext}', quality=90)


@pytest.mark.parametrize('channels', [3, 1])
def test_pipelines_decode_every_stored_form_as_pil_does(tmp_path, channels):
  """Files reach the host's crops as bytes (`Source.fetch`), decoded as the reference's loader
  decodes them (PIL: open, convert to RGB): by TF where its decode is PIL's, else by PIL in the
  crop call. For every stored form the batches equal those of the plain path, PIL's decode into
  pixels and then crops of the pixels, for the two-view stream, the evaluation input and the
  probe's input. (TF's decoders alone, the old route, differ here: palette BMPs come out as grey
  indices, CMYK JPEGs a few levels off.)"""
  from mocojax.data import labelled
  _mixed_folder(tmp_path)
  source = sources.get_source(_config(source='folder', data_dir=str(tmp_path),
                                      channels=channels), 'train')
  assert source.fetch(tf.constant(0))['image'].dtype == tf.string

  def pil_pixels(data):
    pixels = np.asarray(sources.open_image(data, channels))
    return pixels.reshape(pixels.shape[:2] + (channels,))

  def pil_lookup(index):  # the plain path: the reference's decode, into pixels
    example = source.fetch(index)
    image = tf.numpy_function(pil_pixels, [example['image']], tf.uint8, stateful=False)
    image.set_shape([None, None, channels])
    return dict(example, image=image)
  plain = dataclasses.replace(source, _fetch=None, _lookup=pil_lookup)
  assert plain.fetch(tf.constant(0))['image'].dtype == tf.uint8

  # Files in sorted order: RGB, CMYK JPEG, palette BMP; grey JPEG, PNG, RGB JPEG. TF decodes
  # the RGB and grey JPEGs to three channels as PIL does and takes those; PIL the rest.
  tf_decodes = [True, False, False, True, False, True] if channels == 3 else [False] * 6
  for k, example in enumerate(_lookup_in_map(plain, list(range(6)))):
    encoded = source.fetch(tf.constant(k))['image']
    np.testing.assert_array_equal(sources.image_size(encoded), example['image'].shape[:2])
    assert bool(sources.tf_decodes_as_pil(encoded, channels)) == tf_decodes[k]

  host = dict(global_batch=6, seed=0, process_index=0, process_count=1)
  streams = [
      lambda s: pipeline.train_dataset(s, start_step=0, image_size=24, **host),
      lambda s: pipeline.eval_dataset(s, image_size=16, global_batch=4, process_index=0,
                                      process_count=1),
      lambda s: labelled.train_dataset(s, image_size=20, **host)]
  for stream in streams:
    for fast, slow in zip(*(list(stream(s).take(2).as_numpy_iterator())
                            for s in (source, plain))):
      assert fast.keys() == slow.keys()
      for key in fast:
        np.testing.assert_array_equal(fast[key], slow[key], err_msg=key)
      assert all(v.shape[-1] == channels for v in fast.values() if v.ndim == 4)


def test_image_folder_grayscale_channels(tmp_path):
  _write_png(tmp_path / 'a' / '0.png', np.full((4, 4, 3), 200, np.uint8))
  source = sources.get_source(
      _config(source='folder', data_dir=str(tmp_path), channels=1), 'train')
  assert source.image_shape == (None, None, 1)
  assert source.lookup(0)['image'].shape == (4, 4, 1)


def test_missing_image_folder_raises_a_helpful_error(tmp_path):
  with pytest.raises(sources.DatasetNotFoundError, match='data.data_dir'):
    sources.get_source(_config(source='folder',
                               data_dir=str(tmp_path / 'none')), 'train')
  (tmp_path / 'empty' / 'cls').mkdir(parents=True)
  with pytest.raises(sources.DatasetNotFoundError, match='found no'):
    sources.get_source(_config(source='folder',
                               data_dir=str(tmp_path / 'empty')), 'train')


# --------------------------------------------------------------------- TFDS

def _tiny_builder_class():
  import tensorflow_datasets as tfds

  class MocojaxTinyImages(tfds.core.GeneratorBasedBuilder):
    """8 random 6x6 RGB images in 3 classes; the label is index % 3."""
    VERSION = tfds.core.Version('1.0.0')

    def _info(self):
      return tfds.core.DatasetInfo(
          builder=self,
          features=tfds.features.FeaturesDict({
              'image': tfds.features.Image(shape=(6, 6, 3)),
              'label': tfds.features.ClassLabel(num_classes=3),
          }),
          supervised_keys=('image', 'label'))

    def _split_generators(self, dl_manager):
      return {'train': self._generate_examples(8),
              'test': self._generate_examples(4)}

    def _generate_examples(self, n):
      rng = np.random.default_rng(n)
      for i in range(n):
        yield i, {'image': rng.integers(0, 256, (6, 6, 3), dtype=np.uint8),
                  'label': i % 3}

  return MocojaxTinyImages


@pytest.fixture(scope='module')
def tiny_tfds(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp('tfds')
  builder = _tiny_builder_class()(data_dir=str(data_dir),
                                  file_format='array_record')
  builder.download_and_prepare()
  return builder.name, str(data_dir)


@pytest.mark.parametrize('in_memory', [True, False])
def test_tfds_source(tiny_tfds, in_memory):
  import tensorflow_datasets as tfds
  name, data_dir = tiny_tfds
  config = _config(source='tfds', name=name, data_dir=data_dir,
                   tfds_in_memory_max_bytes=1 << 20 if in_memory else 0)
  source = sources.get_source(config, 'train')
  assert (source.num_examples, source.num_classes) == (8, 3)
  assert source.image_shape == (6, 6, 3)
  # Both paths must agree with what TFDS itself decodes, in index order.
  reference = tfds.data_source(name, split='train', data_dir=data_dir)
  for i, example in enumerate(_lookup_in_map(source, list(range(8)))):
    np.testing.assert_array_equal(example['image'], reference[i]['image'])
    assert example['label'] == reference[i]['label']


def test_missing_tfds_dataset_raises_a_helpful_error(tmp_path):
  config = _config(source='tfds', name='mnist', data_dir=str(tmp_path))
  with pytest.raises(sources.DatasetNotFoundError) as err:
    sources.get_source(config, 'train')
  assert 'tfds build mnist' in str(err.value)
  assert str(tmp_path) in str(err.value)


def test_tfds_jpeg_dataset_feeds_the_two_view_stream(tmp_path):
  """The ImageNet route: a TFDS dataset of variable-size JPEGs in array_record, read with
  random access, decoded once per example, both views cropped from it on the host."""
  import tensorflow_datasets as tfds
  from mocojax.data import augment

  class MocojaxTinyJpegs(tfds.core.GeneratorBasedBuilder):
    """6 random JPEGs of 20-40 px; the label is index % 2."""
    VERSION = tfds.core.Version('1.0.0')

    def _info(self):
      return tfds.core.DatasetInfo(
          builder=self, features=tfds.features.FeaturesDict({
              'image': tfds.features.Image(shape=(None, None, 3), encoding_format='jpeg'),
              'label': tfds.features.ClassLabel(num_classes=2)}))

    def _split_generators(self, dl_manager):
      return {'train': self._generate_examples(6)}

    def _generate_examples(self, n):
      rng = np.random.default_rng(0)
      for i in range(n):
        h, w = rng.integers(20, 40, 2)
        yield i, {'image': rng.integers(0, 256, (h, w, 3), dtype=np.uint8), 'label': i % 2}

  builder = MocojaxTinyJpegs(data_dir=str(tmp_path), file_format='array_record')
  builder.download_and_prepare()
  source = sources.get_source(
      _config(source='tfds', name=builder.name, data_dir=str(tmp_path)), 'train')
  assert source.image_shape == (None, None, 3) and not source.batched_lookup
  (batch,) = [b for b, _ in zip(pipeline.train_dataset(
      source, global_batch=6, seed=0, start_step=0, image_size=16, process_index=0,
      process_count=1).as_numpy_iterator(), range(1))]
  assert batch['view1'].shape == (6, 16, 16, 3) and batch['view1'].dtype == np.uint8
  # Each view is the crop of the stored JPEG decoded once, at the step's uniforms.
  reference = builder.as_data_source(split='train',
                                     decoders={'image': tfds.decode.SkipDecoding()})
  order = pipeline.epoch_permutation(6, 0, 0).numpy()
  u = pipeline.step_uniforms(0, 0, 6, 0, 6).numpy()
  for row, index in enumerate(order):
    # PIL's decode of the stored bytes (what the reference code's loader sees).
    image = np.asarray(Image.open(io.BytesIO(reference[int(index)]['image'])).convert('RGB'))
    for v in range(2):
      want = augment.random_resized_crop(image, u[row, v], 16).numpy()
      np.testing.assert_array_equal(batch[f'view{v + 1}'][row], want)
    assert batch['label'][row] == reference[int(index)]['label']
