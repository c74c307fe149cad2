r"""Input-pipeline throughput: the host half, the device half and both together, per core.

  python bench/input_pipeline.py                      # JPEG 224 px and Fashion-MNIST 28 px
  python bench/input_pipeline.py --sources=jpeg224 --profile   # + where the time goes
  python bench/input_pipeline.py --sources=jpeg224 --kernels   # + the device half per kernel
  python bench/input_pipeline.py --sources=jpeg224 --train_steps=6   # + the real trainer on it

The two-view `mocov3` stream is built exactly as the trainer builds it:
  * host: `pipeline.train_dataset` (read, decode once, two random resized crops in one PIL
    call, uint8), iterated as numpy;
  * device: `photometric.two_views` (jitter, grayscale, blur, solarize, flip, normalise) on a
    batch already on the device, in the schedule the backend gets (image by image on CPUs);
  * end to end: `pipeline.train_batches`, both halves as the trainer runs them, each batch
    waited for;
  * evaluation input: `pipeline.eval_dataset` (resize the shorter side, centre crop; the kNN
    bank's and the probe's input), host only. On a CPU-only machine the "device" is the same CPU, so this figure counts the
    device half honestly on the same cores; it is the figure to compare with a CPU loader.
Sources:
  * `jpeg224`: an image folder of JPEG files (ImageNet-like sizes, 300-500 px, decoded on every
    read, cropped to 224 with scale (0.08, 1)), written to a temporary directory;
  * `fmnist28`: the Fashion-MNIST IDX files, in memory, 28 px.
Images/s counts two-view samples; "per core" divides by the cores the process may use.

--profile splits the JPEG stream into stages (each measured on its own, same tf.data
parallelism): read + decode, crop windows, crop + resize, and each device-side op.
--kernels traces the device half (`jax.profiler`, three calls on one batch) and sums the time of
each compiled kernel from the trace: where a CPU spends the device half, kernel by kernel.
--train_steps runs `train.train_and_evaluate` (ViT-S/16, batch --e2e_batch) on the JPEG folder
and reports its images/s and `input_wait_fraction` (the share of wall time the loop waited for
input while the device ran the previous step).
The projection for an accelerator host divides a step rate by the host half's per-core rate:
there the device half runs on the accelerator, at the FLOP and byte cost printed.

For the PyTorch reference loader on the same files, see bench/reference_loader.py.
"""

import os
import sys
import tempfile
import time

import numpy as np
from absl import app, flags

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_step as step_bench  # noqa: E402  bench/train_step.py: configs and analytic FLOPs

_SOURCES = flags.DEFINE_list('sources', ['jpeg224', 'fmnist28'], 'jpeg224, fmnist28')
_JPEG_BATCH = flags.DEFINE_integer('jpeg_batch', 64, 'Global batch for jpeg224.')
_JPEG_FILES = flags.DEFINE_integer('jpeg_files', 512, 'JPEG files written for jpeg224.')
_JPEG_DIR = flags.DEFINE_string('jpeg_dir', None, 'Use (or write) the JPEG folder here.')
_SECONDS = flags.DEFINE_float('seconds', 20.0, 'Timed seconds per measurement (after warm-up).')
_PROFILE = flags.DEFINE_bool('profile', False, 'Per-stage breakdown of the jpeg224 stream.')
_KERNELS = flags.DEFINE_bool('kernels', False, 'Per-kernel times of the device half (jpeg224).')
_TRAIN_STEPS = flags.DEFINE_integer('train_steps', 0, 'Trainer steps on the JPEG folder (0: '
                                    'skip).')
_E2E_BATCH = flags.DEFINE_integer('e2e_batch', 16, 'Global batch of the trainer run.')
_FMNIST = flags.DEFINE_string('fmnist_dir', '/usr/share/datasets/fashion-mnist', 'IDX files.')

# Step rates of the MoCo v3 step on one H200 (bf16, batch 256; bench/RESULTS.md, 2026-11-30),
# and the step-speed issue's goals, for the projection.
H200_STEP_RATES = {'ViT-S/16 measured': 1836, 'ViT-B/16 measured': 958,
                   'ViT-S/16 goal': 4000, 'ViT-B/16 goal': 1700}


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


def _rate(batches, batch: int, seconds: float, block=lambda x: x) -> float:
  for _ in range(3):  # warm-up: threads, AUTOTUNE, compilation
    block(next(batches))
  n, t0 = 0, time.perf_counter()
  while time.perf_counter() - t0 < seconds:
    block(next(batches))
    n += batch
  return n / (time.perf_counter() - t0)


def _source(name: str):
  import ml_collections
  from configs import common
  from mocojax.data import sources
  if name == 'jpeg224':
    root = _JPEG_DIR.value or tempfile.mkdtemp(prefix='mocojax_jpeg_')
    if not os.path.isdir(os.path.join(root, 'class0')):
      write_jpeg_folder(root, _JPEG_FILES.value)
    dc = ml_collections.ConfigDict(dict(source='folder', data_dir=root, name='jpeg',
                                        train_split='train', eval_split='val', channels=3))
    kw = dict(image_size=224, mean=common.IMAGENET_MEAN, std=common.IMAGENET_STD,
              crop_scale=(0.08, 1.0))
    return sources.get_source(dc, 'train'), kw, _JPEG_BATCH.value, root
  if name == 'fmnist28':
    dc = ml_collections.ConfigDict(dict(source='idx', data_dir=_FMNIST.value,
                                        name='fashion_mnist', train_split='train',
                                        eval_split='test'))
    kw = dict(image_size=28, mean=(0.2860,), std=(0.3530,), crop_scale=(0.2, 1.0))
    return sources.get_source(dc, 'train'), kw, 256, None
  raise app.UsageError(f'--sources: unknown {name!r}; use jpeg224 or fmnist28.')


def measure(name: str) -> dict:
  """Host half, device half and end to end of one source, in two-view images/s."""
  import functools
  import jax
  from mocojax import parallel
  from mocojax.data import photometric, pipeline, recipes

  src, kw, batch, root = _source(name)
  sharding = parallel.batch_sharding(parallel.make_mesh())
  common = dict(global_batch=batch, seed=0, start_step=0, process_index=0, process_count=1)
  host = pipeline.train_dataset(src, image_size=kw['image_size'], crop_scale=kw['crop_scale'],
                                **common)
  host_rate = _rate(host.as_numpy_iterator(), batch, _SECONDS.value)

  # The device half on one batch already on the device (re-run on the same input).
  sample = next(host.as_numpy_iterator())
  sample = jax.device_put(sample, sharding)
  finish = photometric.per_shard(functools.partial(
      photometric.two_views, specs=recipes.view_specs('mocov3', kw['crop_scale']), seed=0,
      mean=tuple(kw['mean']), std=tuple(kw['std'])), sharding)
  device_rate = _rate(iter(lambda: finish(sample), None), batch, _SECONDS.value / 2,
                      jax.block_until_ready)

  both = pipeline.train_batches(src, sharding=sharding, mean=kw['mean'], std=kw['std'],
                                image_size=kw['image_size'], crop_scale=kw['crop_scale'],
                                **common)
  e2e_rate = _rate(both, batch, _SECONDS.value, jax.block_until_ready)

  # Evaluation input (kNN bank, probe): resize the shorter side, centre crop, one view, on
  # the host; normalised on the device. Repeated passes over the split.
  evals = pipeline.eval_dataset(src, global_batch=batch, image_size=kw['image_size'],
                                process_index=0, process_count=1).repeat()
  eval_rate = _rate(evals.as_numpy_iterator(), batch, _SECONDS.value / 2)
  return dict(name=name, batch=batch, host=host_rate, device=device_rate, e2e=e2e_rate,
              eval=eval_rate, root=root, sample=sample, finish=finish)


def device_cost(r: dict) -> dict:
  """FLOPs and bytes of the device half per image, from XLA's cost analysis of the vmapped
  (accelerator) schedule, against the analytic FLOPs of a ViT train step per image."""
  import functools
  import jax
  from configs import common
  from mocojax.data import photometric, recipes
  fn = jax.jit(functools.partial(photometric.two_views, specs=recipes.view_specs('mocov3'),
                                 seed=0, mean=common.IMAGENET_MEAN, std=common.IMAGENET_STD,
                                 per_image=False))
  cost = fn.lower(r['sample']).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  out = dict(flops=cost.get('flops', 0.0) / r['batch'],
             bytes=cost.get('bytes accessed', 0.0) / r['batch'])
  for model in ('mocov3_vit_small', 'mocov3_vit_base'):
    config = step_bench.load_config(model, 256, 'float32')
    out[model] = step_bench.analytic_flops(config, 3)['per_image_step']
  return out


def profile(root: str) -> list:
  """(stage, core-ms per two-view image) of the JPEG stream, each stage measured alone."""
  import dataclasses
  import glob
  import jax
  import tensorflow as tf
  from mocojax.data import augment, photometric, recipes, sources

  cores = len(os.sched_getaffinity(0))
  files = tf.constant(sorted(glob.glob(os.path.join(root, '*', '*.jpg'))))
  n_files = int(files.shape[0])
  seconds = max(4.0, _SECONDS.value / 4)

  def tf_stage(fn):
    ds = tf.data.Dataset.range(1 << 40).map(fn, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(64).prefetch(4)
    return cores * 1e3 / _rate(ds.as_numpy_iterator(), 64, seconds)

  def read(i):
    return tf.io.read_file(files[i % n_files])

  def read_only(i):
    return tf.strings.length(read(i))

  def decode(i):  # these RGB JPEGs TF decodes (as PIL does) before the crop call
    return sources.decode(read(i), 3)[:1, :1]

  def uniforms(i):
    return tf.random.stateless_uniform([2, augment.CROP_UNIFORMS],
                                       tf.stack([tf.cast(i, tf.int32), 7]))

  def windows(i):  # from the JPEG header
    height, width = tf.unstack(sources.image_size(read(i)))
    return tf.stack(augment.crop_window_batch(uniforms(i), height, width))

  def crops(i):  # header, decode, crop + resize, as the pipeline runs them
    return augment.random_resized_crops(read(i), uniforms(i), 224, [(0.08, 1.0)] * 2,
                                        [(3 / 4, 4 / 3)] * 2, channels=3)

  # Stages run cumulatively from the read, each its own tf.data map; differences isolate them.
  read_ms, decode_ms, windows_ms = tf_stage(read_only), tf_stage(decode), tf_stage(windows)
  rows = [('read (and tf.data per element)', read_ms), ('decode', decode_ms - read_ms),
          ('crop windows (2 views, from the header)', windows_ms - read_ms),
          ('crop + resize to 224, uint8, in PIL (2 views)',
           tf_stage(crops) - decode_ms - windows_ms + read_ms)]

  # Device ops, one view's spec with a single op switched on, image by image as on CPUs.
  rng = np.random.default_rng(0)
  images = jax.device_put(rng.integers(0, 256, (64, 224, 224, 3), np.uint8))
  u = jax.device_put(rng.uniform(size=(64, photometric.VIEW_UNIFORMS)).astype(np.float32))
  off = dict(jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, solarize_p=0.0, flip=False)
  base = recipes.view_specs('mocov3')[0]

  def device_ms(spec):
    def one(image, u):
      x = photometric.normalize(photometric.finish_view(image, u, spec), (0.5,) * 3, (0.2,) * 3)
      return x.transpose(1, 2, 0)
    fn = jax.jit(lambda i, u: photometric.over_batch(one, (i, u)))
    return cores * 1e3 / _rate(iter(lambda: fn(images, u), None), 64, seconds / 2,
                               jax.block_until_ready)

  floor = device_ms(dataclasses.replace(base, **off))
  rows.append(('device: uint8 -> float, layout, normalise (per view)', floor))
  for label, change in (('colour jitter, applied (per view)', dict(jitter_p=1.0)),
                        ('grayscale, applied (per view)', dict(grayscale_p=1.0)),
                        ('Gaussian blur, applied (per view)', dict(blur_p=1.0)),
                        ('solarize, applied (per view)', dict(solarize_p=1.0)),
                        ('flip (p 1/2, per view)', dict(flip=True))):
    rows.append((f'device: {label}',
                 device_ms(dataclasses.replace(base, **dict(off, **change))) - floor))
  for v, spec in enumerate(recipes.view_specs('mocov3')):
    rows.append((f'device: mocov3 view {v + 1}, all ops at their rates', device_ms(spec)))
  return rows


def kernel_times(r: dict, calls: int = 3) -> list:
  """(kernel, ms per two-view sample) of the device half on one batch, from a profiler trace:
  the time of every execution of each compiled kernel, summed over threads, largest first."""
  import collections
  import glob
  import gzip
  import json
  import jax
  trace_dir = tempfile.mkdtemp(prefix='mocojax_trace_')
  jax.block_until_ready(r['finish'](r['sample']))
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    for _ in range(calls):
      jax.block_until_ready(r['finish'](r['sample']))
  with gzip.open(glob.glob(os.path.join(trace_dir, '**', '*.json.gz'), recursive=True)[0]) as f:
    events = json.load(f)
  events = events['traceEvents'] if isinstance(events, dict) else events
  total = collections.Counter()
  for e in events:
    # Complete events; Python frames ('$...') and the executor's own spans are not kernels.
    if e.get('ph') == 'X' and not e['name'].startswith(('$', 'ThunkExecutor', 'Pjit',
                                                          'CommonPjRt', 'PjRt')):
      total[e['name']] += e.get('dur', 0)
  return [(name, us / 1e3 / calls / r['batch']) for name, us in total.most_common()]


def trainer_run(root: str) -> dict:
  """The real trainer on the JPEG folder: images/s and the input-wait share of its last log."""
  import json
  from configs import mocov3_vit_small
  from mocojax import train
  config = mocov3_vit_small.get_config()
  config.data.source, config.data.name, config.data.data_dir = 'folder', 'jpeg', root
  config.data.train_split = config.data.eval_split = 'train'
  config.batch_size = _E2E_BATCH.value
  config.stop_after_steps = _TRAIN_STEPS.value
  config.log_every_steps = max(1, _TRAIN_STEPS.value // 2)
  config.eval.knn_every_epochs, config.eval.knn_at_end = 0, False
  config.online_probe.enabled = False
  config.plot = False
  workdir = tempfile.mkdtemp(prefix='mocojax_e2e_')
  train.train_and_evaluate(config, workdir)
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    last = [json.loads(line) for line in f][-1]
  return dict(images_s=last['images_per_sec'], wait=last['input_wait_fraction'],
              batch=config.batch_size, steps=_TRAIN_STEPS.value)


def main(argv):
  del argv
  from mocojax import commands
  commands.start_host()  # as the trainer's entry points set the host up
  import jax
  cores = len(os.sched_getaffinity(0))
  print(f'{cores} cores available to this process; jax backend {jax.default_backend()}')
  rows = []
  for name in _SOURCES.value:
    r = measure(name)
    rows.append(r)
    print(f'{name}: host half {r["host"]:,.1f}, device half {r["device"]:,.1f}, end to end '
          f'{r["e2e"]:,.1f} two-view images/s ({r["e2e"] / cores:,.1f} per core), batch '
          f'{r["batch"]}; evaluation input (one centre crop) {r["eval"]:,.1f} images/s '
          f'({r["eval"] / cores:,.1f} per core)', flush=True)

  print('\n| source | host half, img/s per core | device half, img/s per core | end to end, '
        'img/s | end to end, per core |')
  print('|---|---|---|---|---|')
  for r in rows:
    print(f'| {r["name"]} | {r["host"] / cores:,.1f} | {r["device"] / cores:,.1f} | '
          f'{r["e2e"]:,.1f} | **{r["e2e"] / cores:,.1f}** |')

  jpeg = next((r for r in rows if r['name'] == 'jpeg224'), None)
  if jpeg is not None:
    cost = device_cost(jpeg)
    print(f'\nDevice half per two-view image (XLA cost analysis, vmapped schedule): '
          f'{cost["flops"] / 1e6:,.1f} MFLOP, {cost["bytes"] / 1e6:,.1f} MB accessed; '
          f'{cost["flops"] / cost["mocov3_vit_small"]:.1e} of a ViT-S/16 step\'s FLOPs per '
          f'image ({cost["mocov3_vit_small"] / 1e9:,.0f} GFLOP), '
          f'{cost["flops"] / cost["mocov3_vit_base"]:.1e} of ViT-B/16\'s '
          f'({cost["mocov3_vit_base"] / 1e9:,.0f} GFLOP). Host to device: '
          f'{2 * 224 * 224 * 3 / 1e3:,.0f} kB (uint8) instead of {8 * 224 * 224 * 3 / 1e3:,.0f}'
          f' kB (float32) per image.')
    per_core = jpeg['host'] / cores
    print(f'\nAccelerator host, device half on the accelerator: host cores needed at '
          f'{per_core:,.1f} two-view images/s per core (this machine\'s host half):')
    print('| step | images/s | host cores |')
    print('|---|---|---|')
    for label, step_rate in H200_STEP_RATES.items():
      print(f'| H200 {label} | {step_rate:,} | {step_rate / per_core:,.1f} |')

    if _PROFILE.value:
      print('\n| stage (jpeg224, mocov3) | core-ms per two-view image |')
      print('|---|---|')
      for stage, ms in profile(jpeg['root']):
        print(f'| {stage} | {ms:.2f} |')

    if _KERNELS.value:
      rows = kernel_times(jpeg)
      print('\n| device-half kernel (conditionals include the kernels they run) | ms per sample |')
      print('|---|---|')
      for name, ms in rows[:20]:
        print(f'| {name} | {ms:.3f} |')

    if _TRAIN_STEPS.value:
      t = trainer_run(jpeg['root'])
      print(f'\nTrainer (ViT-S/16, batch {t["batch"]}, {t["steps"]} steps) on the JPEG folder: '
            f'{t["images_s"]:,.2f} images/s, input wait {100 * t["wait"]:.1f}% of wall time.')


if __name__ == '__main__':
  app.run(main)
