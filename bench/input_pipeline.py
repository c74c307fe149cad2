r"""Input-pipeline throughput, and whether it feeds the train step fast enough.

  python bench/input_pipeline.py                      # JPEG 224 px and Fashion-MNIST 28 px
  python bench/input_pipeline.py --step_models=       # pipeline only, skip the step timing

Measures two-view `mocov3` batches per second out of `pipeline.train_dataset` exactly as the
trainer builds it (stateless per-step augmentation, batched ops, AUTOTUNE), iterated as numpy
on the host (no device transfer), after a warm-up:
  * `jpeg224`: an image folder of JPEG files (ImageNet-like sizes, decoded on every read,
    random-resized-crop to 224, full mocov3 augmentation), written to a temporary directory;
  * `fmnist28`: the Fashion-MNIST IDX files, in memory, 28 px.
Images/s counts two-view samples; "per core" divides by the cores the process may use, since
tf.data spreads the work over all of them. The train step's images/s on the same machine
(bench/train_step.py's measurement: ViT-S/16 at 224 and the demo model) gives the ratio
pipeline / step: above 1 the host feeds faster than the step consumes.
"""

import os
import sys
import tempfile
import time

import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_step as step_bench  # noqa: E402  bench/train_step.py; its flags (--batch) apply

_SOURCES = flags.DEFINE_list('sources', ['jpeg224', 'fmnist28'], 'jpeg224, fmnist28')
_JPEG_BATCH = flags.DEFINE_integer('jpeg_batch', 64, 'Global batch for jpeg224.')
_JPEG_FILES = flags.DEFINE_integer('jpeg_files', 512, 'JPEG files written for jpeg224.')
_SECONDS = flags.DEFINE_float('seconds', 20.0, 'Timed seconds per source (after warm-up).')
_STEP_MODELS = flags.DEFINE_list('step_models', ['vit_small', 'demo'],
                                 'Models whose train step to time for the ratio (may be empty).')
_FMNIST = flags.DEFINE_string('fmnist_dir', '/usr/share/datasets/fashion-mnist', 'IDX files.')


def write_jpeg_folder(root: str, n: int, seed: int = 0) -> str:
  """n JPEGs of ImageNet-like sizes (~400x350, smooth content plus texture) in 10 classes."""
  import tensorflow as tf
  rng = np.random.default_rng(seed)
  for i in range(n):
    h, w = int(rng.integers(300, 500)), int(rng.integers(300, 500))
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    base = np.stack([np.sin(2 * np.pi * (a * x + b * y) + c)
                     for a, b, c in rng.uniform(0.5, 4, size=(3, 3))], -1)
    img = np.clip(127 + 80 * base + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
    d = os.path.join(root, f'class{i % 10}')
    os.makedirs(d, exist_ok=True)
    tf.io.write_file(os.path.join(d, f'{i}.jpg'), tf.io.encode_jpeg(img, quality=90))
  return root


def time_dataset(ds, seconds: float, batch: int) -> float:
  it = ds.as_numpy_iterator()
  for _ in range(3):  # warm-up: threads, AUTOTUNE
    next(it)
  n, t0 = 0, time.perf_counter()
  while time.perf_counter() - t0 < seconds:
    next(it)
    n += 1
  return n * batch / (time.perf_counter() - t0)


def pipeline_rate(name: str) -> dict:
  import ml_collections
  from configs import common
  from mocojax.data import pipeline, sources

  if name == 'jpeg224':
    root = write_jpeg_folder(tempfile.mkdtemp(prefix='mocojax_jpeg_'), _JPEG_FILES.value)
    dc = ml_collections.ConfigDict(dict(source='folder', data_dir=root, name='jpeg',
                                        train_split='train', eval_split='val', channels=3))
    src = sources.get_source(dc, 'train')
    kw = dict(image_size=224, mean=common.IMAGENET_MEAN, std=common.IMAGENET_STD,
              crop_scale=(0.08, 1.0))
    batch = _JPEG_BATCH.value
  elif name == 'fmnist28':
    dc = ml_collections.ConfigDict(dict(source='idx', data_dir=_FMNIST.value, name='fashion_mnist',
                                        train_split='train', eval_split='test'))
    src = sources.get_source(dc, 'train')
    kw = dict(image_size=28, mean=(0.2860,), std=(0.3530,), crop_scale=(0.2, 1.0))
    batch = 256
  else:
    raise app.UsageError(f'--sources: unknown {name!r}; use jpeg224 or fmnist28.')
  ds = pipeline.train_dataset(src, global_batch=batch, seed=0, start_step=0, recipe='mocov3',
                              process_index=0, process_count=1, **kw)
  rate = time_dataset(ds, _SECONDS.value, batch)
  return dict(name=name, batch=batch, images_s=rate)


def main(argv):
  del argv
  import tensorflow as tf
  tf.config.set_visible_devices([], 'GPU')
  cores = len(os.sched_getaffinity(0))
  print(f'{cores} cores available to this process')
  rows = []
  for name in _SOURCES.value:
    r = pipeline_rate(name)
    r['per_core'] = r['images_s'] / cores
    print(f'pipeline {name}: {r["images_s"]:,.1f} two-view images/s '
          f'({r["per_core"]:,.1f} per core), global batch {r["batch"]}', flush=True)
    rows.append(r)

  steps = {}
  if _STEP_MODELS.value:
    flags.FLAGS.steps, flags.FLAGS.warmup = 3, 1
    for model in _STEP_MODELS.value:
      steps[model] = step_bench.measure(model)['images_s']

  pairs = {'jpeg224': 'vit_small', 'fmnist28': 'demo'}
  print('\n| pipeline | images/s | per core | train step (same machine) | step images/s | '
        'pipeline / step |')
  print('|---|---|---|---|---|---|')
  for r in rows:
    model = pairs[r['name']]
    s = steps.get(model)
    ratio = f'{r["images_s"] / s:,.1f}x' if s else 'n/a'
    step = f'{s:,.2f}' if s else 'not timed'
    print(f'| {r["name"]} | {r["images_s"]:,.1f} | {r["per_core"]:,.1f} | {model} | {step} | '
          f'{ratio} |')


if __name__ == '__main__':
  app.run(main)
