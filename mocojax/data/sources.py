"""Random-access image sources.

Every source exposes `lookup(index)` usable inside a `tf.data` map. Random
access (rather than a streaming reader) is what lets the training pipeline be a
pure function of (seed, step): any step's batch can be rebuilt without replaying
the stream that came before it, so resuming needs no iterator checkpoint.
Sources of files and records also expose `fetch(index)`, the encoded bytes, which the host's
crops decode to PIL's pixels themselves (`tf_decodes_as_pil`).
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import os
import pathlib
import zlib
from typing import Callable

import numpy as np
import tensorflow as tf
from PIL import Image

# tf.data may serialise its graph (static optimisations, tf.data service); a
# captured in-memory array then becomes a graph constant and graphs are capped
# at 2 GiB. Stay well under that before switching to on-disk random access.
DEFAULT_IN_MEMORY_MAX_BYTES = 1 << 30

_FOLDER_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp')

_IDX_FILES = {
    'train': ('train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz'),
    'test': ('t10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz'),
}


def decode(encoded, channels: int):
  """uint8 [H, W, channels] from encoded JPEG, PNG, BMP or GIF bytes (a GIF's first frame).

  JPEGs are decoded with the accurate integer IDCT, as PIL (the reference code's loader) and
  libjpeg by default do: TF's default, the fast IDCT, differs from PIL's pixels by up to a few
  grey levels in most images (tests/test_sources.py), and costs about the same. This is
  `Source.lookup`'s decode; the pipelines' host crops take the bytes (`Source.fetch`) and use it
  only where it gives PIL's pixels (`tf_decodes_as_pil`), else PIL itself (`open_image`).
  """
  def jpeg():
    return tf.io.decode_jpeg(encoded, channels=channels, dct_method='INTEGER_ACCURATE')

  def other():
    # expand_animations=False keeps GIFs 3-D so shapes stay static-rank.
    return tf.io.decode_image(encoded, channels=channels, expand_animations=False,
                              dtype=tf.uint8)
  return tf.cond(tf.io.is_jpeg(encoded), jpeg, other)


def encoded_bytes(value) -> bytes | None:
  """The bytes of an encoded image as `tf.numpy_function` hands a tf.string scalar over (bytes
  inside tf.data, a 0-d object array eagerly); None for pixels."""
  if isinstance(value, np.ndarray) and value.dtype == object:
    value = value.item()
  return value if isinstance(value, bytes) else None


def open_image(data, channels: int) -> Image.Image:
  """PIL's decode of encoded bytes, in RGB (or L for one channel), as the reference code's
  loader (torchvision's `pil_loader`) decodes: the host's crops run on it in the same call."""
  image = Image.open(io.BytesIO(encoded_bytes(data)))
  mode = 'L' if channels == 1 else 'RGB'
  return image if image.mode == mode else image.convert(mode)


def tf_decodes_as_pil(encoded, channels: int):
  """Whether `decode` gives PIL's pixels for these bytes: RGB and grey JPEGs, decoded to three
  channels. The host's crops then let TF decode them, outside Python and its lock; PIL decodes
  the rest (CMYK JPEGs, where TF is a few levels off; palette images, which TF's BMP decoder
  returns as grey indices; one-channel output, where TF keeps the JPEG's Y and PIL recomputes
  luma; PNG, BMP and GIF variants generally)."""
  if channels != 3:
    return tf.constant(False)
  return tf.cond(tf.io.is_jpeg(encoded),
                 lambda: tf.image.extract_jpeg_shape(encoded)[2] != 4,
                 lambda: tf.constant(False))


def with_pil_pixels(encoded, channels: int, fn):
  """fn applied to the image that PIL decodes from `encoded`: fn(TF's pixels) where they are
  PIL's (`tf_decodes_as_pil`), else fn(encoded) for an fn whose Python call decodes the bytes
  itself (`open_image`). Both must give the same dtype and shape."""
  return tf.cond(tf_decodes_as_pil(encoded, channels),
                 lambda: fn(decode(encoded, channels)), lambda: fn(encoded))


def image_size(image):
  """int32 [2] (height, width) of uint8 pixels [H, W, C], or of an encoded image (a tf.string
  scalar) read from its header alone, without decoding."""
  if image.dtype != tf.string:
    return tf.shape(image)[-3:-1]

  def header(data):  # PIL reads only the header until pixels are asked for
    width, height = Image.open(io.BytesIO(encoded_bytes(data))).size
    return np.array([height, width], np.int32)

  def other():
    hw = tf.numpy_function(header, [image], tf.int32, stateful=False)
    hw.set_shape([2])
    return hw
  return tf.cond(tf.io.is_jpeg(image),
                 lambda: tf.image.extract_jpeg_shape(image)[:2], other)


class DatasetNotFoundError(FileNotFoundError):
  """A configured dataset is not on disk; the message says how to get it."""


@dataclasses.dataclass(frozen=True)
class Source:
  """A split of labelled images with random access by integer index.

  `image_shape` is (H, W, C) of the stored images; H and W are None when the
  images differ in size (image folders, ImageNet), in which case `lookup`
  returns [None, None, C] and the pipeline resizes.
  """

  name: str
  num_examples: int
  num_classes: int
  image_shape: tuple
  _lookup: Callable[[tf.Tensor], dict] = dataclasses.field(
      repr=False, compare=False)
  # Whether lookup also takes a vector of indices and returns a stacked
  # batch (same-size in-memory images), letting the pipeline work per step.
  batched_lookup: bool = False
  # Encoded bytes by index, for sources of files and records (see `fetch`).
  _fetch: Callable[[tf.Tensor], dict] | None = dataclasses.field(
      default=None, repr=False, compare=False)

  def lookup(self, index: tf.Tensor) -> dict:
    """{'image': uint8 [H, W, C], 'label': int32 []} for a scalar int index
    (with `batched_lookup`, also [N, H, W, C] and [N] for indices [N])."""
    return self._lookup(index)

  def fetch(self, index: tf.Tensor) -> dict:
    """{'image', 'label'} for a scalar index, the image as stored: encoded bytes (a tf.string
    scalar) for sources of files and records, else uint8 pixels as `lookup` gives them.

    The host's crops (`augment`) take either; given bytes they decode them to PIL's pixels, by
    TF where its decode is PIL's and by PIL in the crop call elsewhere (`tf_decodes_as_pil`).
    """
    return self._lookup(index) if self._fetch is None else self._fetch(index)

  @classmethod
  def from_arrays(cls, images, labels, name: str = 'arrays',
                  num_classes: int | None = None) -> 'Source':
    """Source over in-memory arrays: images uint8 [N, H, W, C], labels [N]."""
    images = np.asarray(images)
    labels = np.asarray(labels)
    if images.dtype != np.uint8 or images.ndim != 4:
      raise ValueError(
          f'images must be uint8 [N, H, W, C], got {images.dtype} '
          f'{images.shape}')
    if labels.shape != images.shape[:1]:
      raise ValueError(
          f'labels shape {labels.shape} does not match {images.shape[0]} '
          'images')
    if num_classes is None:
      num_classes = int(labels.max()) + 1 if labels.size else 0
    # Converted once here so that every map call gathers from the same
    # tensor instead of re-embedding the numpy array.
    images_t = tf.constant(images)
    labels_t = tf.constant(labels.astype(np.int32))

    def lookup(index):
      return {'image': tf.gather(images_t, index),
              'label': tf.gather(labels_t, index)}

    return cls(name=name, num_examples=int(images.shape[0]),
               num_classes=int(num_classes),
               image_shape=tuple(int(d) for d in images.shape[1:]),
               _lookup=lookup, batched_lookup=True)


def get_source(data_config, split: str) -> Source:
  """Builds the Source that `data_config.source` names, for `split`."""
  kind = data_config.source
  if kind == 'idx':
    return _idx_source(data_config, split)
  if kind == 'folder':
    return _folder_source(data_config, split)
  if kind == 'tfds':
    return _tfds_source(data_config, split)
  if kind == 'arrays':
    raise ValueError(
        "data.source='arrays' cannot be built from a config; construct it "
        'with Source.from_arrays(images, labels).')
  raise ValueError(
      f"Unknown data.source={kind!r}; expected 'idx', 'tfds', 'folder' or "
      "'arrays'.")


def _config_get(config, key, default):
  # ConfigDict and plain dicts both support .get; attribute-only objects don't.
  getter = getattr(config, 'get', None)
  if getter is not None:
    return getter(key, default)
  return getattr(config, key, default)


# ---------------------------------------------------------------- IDX (MNIST)

def read_idx(path) -> np.ndarray:
  """Reads a (optionally gzipped) IDX file, the MNIST/Fashion-MNIST format."""
  path = str(path)
  opener = gzip.open if path.endswith('.gz') else open
  try:
    with opener(path, 'rb') as f:
      data = f.read()
  except (EOFError, gzip.BadGzipFile, zlib.error) as e:
    # gzip names neither the file nor the likely cause (a cut-short
    # download or copy).
    raise ValueError(
        f'{path} is not a complete gzip file ({e}); it is truncated or '
        'damaged: download or copy it again.') from e
  if len(data) < 4 or data[0] != 0 or data[1] != 0:
    raise ValueError(f'{path} is not an IDX file (bad magic number).')
  if data[2] != 0x08:
    raise ValueError(
        f'{path}: only unsigned-byte IDX data is supported, got type code '
        f'{data[2]:#x}.')
  ndim = data[3]
  dims = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], 'big')
               for i in range(ndim))
  offset = 4 + 4 * ndim
  array = np.frombuffer(data, dtype=np.uint8, offset=offset)
  if array.size != int(np.prod(dims)):
    raise ValueError(f'{path}: header says {dims}, found {array.size} bytes.')
  return array.reshape(dims)


def _idx_source(data_config, split: str) -> Source:
  data_dir = pathlib.Path(os.path.expanduser(str(data_config.data_dir)))
  if split not in _IDX_FILES:
    raise ValueError(
        f"data.source='idx' knows splits {sorted(_IDX_FILES)}, got "
        f'{split!r}.')
  image_file, label_file = (data_dir / f for f in _IDX_FILES[split])
  missing = [str(p) for p in (image_file, label_file) if not p.exists()]
  if missing:
    raise DatasetNotFoundError(
        f'data.data_dir={str(data_config.data_dir)!r} (data.source=\'idx\'): '
        f'missing {", ".join(missing)}. Point data.data_dir at a folder with '
        'the gzipped IDX files (train-images-idx3-ubyte.gz, '
        'train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, '
        't10k-labels-idx1-ubyte.gz); on Debian/Ubuntu '
        '`apt-get install dataset-fashion-mnist` puts Fashion-MNIST in '
        '/usr/share/datasets/fashion-mnist, or download them from '
        'https://github.com/zalandoresearch/fashion-mnist.')
  images = read_idx(image_file)
  labels = read_idx(label_file)
  if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
    raise ValueError(
        f'{label_file} holds {labels.shape[0]} labels but {image_file} holds '
        f'{images.shape[0]} images: the two files must be the same split '
        '(both train-* or both t10k-*) of the same dataset.')
  if images.ndim == 3:  # IDX stores greyscale as [N, H, W]
    images = images[..., None]
  name = _config_get(data_config, 'name', None) or 'idx'
  return Source.from_arrays(images, labels, name=f'{name}/{split}',
                            num_classes=int(labels.max()) + 1)


# ------------------------------------------------------------- image folders

def _folder_source(data_config, split: str) -> Source:
  """One sub-folder per class under data_dir/<split> (or data_dir itself).

  Class ids follow sorted folder names, as torchvision's ImageFolder does, so
  label ids agree between splits that hold the same class folders. Only paths
  are kept in memory; images are decoded on lookup.
  """
  base = pathlib.Path(os.path.expanduser(str(data_config.data_dir)))
  root = base / split if (base / split).is_dir() else base
  channels = int(_config_get(data_config, 'channels', 3))
  if not root.is_dir():
    raise DatasetNotFoundError(
        f'data.data_dir={str(data_config.data_dir)!r} (data.source=\'folder\')'
        f': no folder at {root} (looked for {base / split} and {base}). '
        'Expected <data_dir>/<split>/<class>/<image>.{jpg,png} or '
        '<data_dir>/<class>/<image>; for ImageNet, download ILSVRC2012 from '
        'https://image-net.org (manual registration) and unpack train/ and '
        'val/ into class sub-folders.')
  classes = sorted(p.name for p in root.iterdir() if p.is_dir())
  paths, labels = [], []
  for label, cls_name in enumerate(classes):
    for p in sorted((root / cls_name).iterdir()):
      if p.suffix.lower() in _FOLDER_EXTENSIONS:
        paths.append(str(p))
        labels.append(label)
  if not paths:
    raise DatasetNotFoundError(
        f'data.data_dir={str(data_config.data_dir)!r} (data.source=\'folder\')'
        f': found no {"/".join(_FOLDER_EXTENSIONS)} images in class '
        f'sub-folders of {root}.')
  paths_t = tf.constant(paths)
  labels_t = tf.constant(np.asarray(labels, np.int32))

  def fetch(index):
    return {'image': tf.io.read_file(tf.gather(paths_t, index)),
            'label': tf.gather(labels_t, index)}

  def lookup(index):
    example = fetch(index)
    image = decode(example['image'], channels)
    image.set_shape([None, None, channels])
    return dict(example, image=image)

  return Source(name=f'folder:{root}', num_examples=len(paths),
                num_classes=len(classes),
                image_shape=(None, None, channels), _lookup=lookup,
                _fetch=fetch)


# ---------------------------------------------------------------------- TFDS

def _tfds_source(data_config, split: str) -> Source:
  """A prepared TFDS dataset.

  Small datasets (decoded size <= data.tfds_in_memory_max_bytes, default
  1 GiB, and a fixed image shape) are decoded once into memory. Larger ones
  are read with random access through `builder.as_data_source`, which needs
  the dataset built in the array_record format
  (`tfds build NAME --file_format=array_record`). Encoded bytes are fetched
  with `tf.numpy_function` (one Python call per example, under the GIL) and
  decoded by TF ops (or, where those differ from PIL, by PIL in the host crops'
  call, which releases the GIL), so decoding still runs in parallel; such a
  pipeline cannot be serialised (no tf.data service or snapshot).
  """
  import tensorflow_datasets as tfds  # heavy import, only when used

  name = data_config.name
  data_dir = _config_get(data_config, 'data_dir', None) or None
  image_key = _config_get(data_config, 'image_key', 'image')
  label_key = _config_get(data_config, 'label_key', 'label')
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except Exception as e:  # unknown name or broken registration
    raise DatasetNotFoundError(
        f'data.name={name!r} (data.source=\'tfds\'): TFDS cannot find this '
        f'dataset ({e}).') from e
  if not builder.is_prepared():
    raise DatasetNotFoundError(
        f'data.name={name!r} (data.source=\'tfds\') is not prepared in '
        f'data.data_dir={data_dir!r} (looked in {builder.data_dir}). Build it '
        f'with `tfds build {name} --data_dir='
        f'{data_dir or "~/tensorflow_datasets"} --file_format=array_record` '
        'on a machine with internet access and copy the folder here; for '
        'imagenet2012 first download ILSVRC2012_img_train.tar and '
        'ILSVRC2012_img_val.tar by hand (https://image-net.org) into '
        '<data_dir>/downloads/manual/.')
  info = builder.info
  if split not in info.splits:
    raise ValueError(
        f'data split {split!r} not in {name!r}; available: '
        f'{sorted(info.splits.keys())}.')
  num_examples = int(info.splits[split].num_examples)
  num_classes = int(info.features[label_key].num_classes)
  image_shape = tuple(info.features[image_key].shape)
  limit = int(_config_get(data_config, 'tfds_in_memory_max_bytes',
                          DEFAULT_IN_MEMORY_MAX_BYTES))
  array_record = (info.file_format ==
                  tfds.core.file_adapters.FileFormat.ARRAY_RECORD)
  fixed = all(d is not None for d in image_shape)
  if fixed and num_examples * int(np.prod(image_shape)) <= limit:
    if array_record:  # as_dataset cannot read array_record files
      records = builder.as_data_source(split=split)
      everything = records.__getitems__(range(num_examples))
      images = np.stack([r[image_key] for r in everything])
      labels = np.array([r[label_key] for r in everything])
    else:
      arrays = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))
      images, labels = arrays[image_key], arrays[label_key]
    return Source.from_arrays(images, labels, name=f'{name}/{split}',
                              num_classes=num_classes)
  if not array_record:
    raise ValueError(
        f'data.name={name!r} (data.source=\'tfds\') is too large to hold in '
        f'memory ({num_examples} examples, data.tfds_in_memory_max_bytes='
        f'{limit}) and random access needs the array_record format: rebuild '
        f'with `tfds build {name} --file_format=array_record`.')

  records = builder.as_data_source(
      split=split, decoders={image_key: tfds.decode.SkipDecoding()})

  def fetch(i):
    record = records[int(i)]
    return record[image_key], np.int32(record[label_key])

  def fetch_encoded(index):
    encoded, label = tf.numpy_function(
        fetch, [index], (tf.string, tf.int32), stateful=False)
    encoded.set_shape([])
    label.set_shape([])
    return {'image': encoded, 'label': label}

  def lookup(index):
    example = fetch_encoded(index)
    image = decode(example['image'], image_shape[-1])
    image.set_shape(image_shape)
    return dict(example, image=image)

  return Source(name=f'{name}/{split}', num_examples=num_examples,
                num_classes=num_classes, image_shape=image_shape,
                _lookup=lookup, _fetch=fetch_encoded)
