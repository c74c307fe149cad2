"""Plots of a run: `python -m mocojax.report --workdir=runs/demo`.

Reads `metrics.jsonl` (written by the trainer next to the TensorBoard events) and writes
`training.png`: loss; kNN top-1 against epoch; learning rate and momentum; and the
infinity-norm of the first-layer and last-block gradients on a log scale, the signals the
MoCo v3 paper (Fig. 5) used to find its instabilities. With --embedding (default) it also
restores the latest checkpoint's backbone and writes `features_tsne.png`: a 2-D t-SNE of the
features of the first --embedding_points test images, coloured by class. Both PNGs are logged
to TensorBoard as images too.
"""

import json
import os

from absl import app, flags


def read_metrics(workdir: str) -> list:
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    raise FileNotFoundError(f'No metrics at {path}: is --workdir the directory of a training run?')
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def _series(rows, key, x='step'):
  pts = [(r[x], r[key]) for r in rows if key in r and x in r]
  # A resumed run may re-log steps; the latest value for a step wins.
  return zip(*sorted(dict(pts).items())) if pts else ((), ())


def write_plots(workdir: str, out_name: str = 'training.png') -> str:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  rows = read_metrics(workdir)
  fig, axes = plt.subplots(2, 2, figsize=(12, 8))
  ax = axes[0, 0]
  ax.plot(*_series(rows, 'loss'), label='loss')
  ax.set(title='MoCo loss', xlabel='step', ylabel='loss')

  ax = axes[0, 1]
  knn_keys = sorted({k for r in rows for k in r if k.startswith('knn/')})
  acc_keys = knn_keys + (['probe/test_top1'] if any('probe/test_top1' in r for r in rows) else [])
  for key in acc_keys:
    xs, ys = _series(rows, key, x='epoch')
    label = key.replace('knn/top1@', 'kNN k=').replace('probe/test_top1', 'online linear probe')
    ax.plot(xs, [100 * y for y in ys], marker='o', label=label)
  ax.set(title='test top-1 (kNN: cosine, T=0.07, backbone features)', xlabel='epoch', ylabel='%')
  if acc_keys:
    ax.legend()

  ax = axes[1, 0]
  ax.plot(*_series(rows, 'lr'), color='tab:blue')
  ax.set(title='learning rate and momentum', xlabel='step')
  ax.set_ylabel('lr', color='tab:blue')
  twin = ax.twinx()
  twin.plot(*_series(rows, 'momentum'), color='tab:orange')
  twin.set_ylabel('momentum m', color='tab:orange')

  ax = axes[1, 1]
  for key in ('grad_max/first_layer', 'grad_max/last_block'):
    ax.plot(*_series(rows, key), label=key.split('/')[1].replace('_', ' '))
  ax.set_yscale('log')
  ax.set(title='gradient infinity-norm', xlabel='step')
  ax.legend()

  fig.suptitle(os.path.basename(os.path.normpath(workdir)))
  fig.tight_layout()
  path = os.path.join(workdir, out_name)
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def test_features(workdir: str, num_points: int):
  """Backbone features (as the kNN monitor sees them) and labels of the first test images."""
  import jax
  import numpy as np

  from mocojax import parallel
  from mocojax.data import pipeline, sources
  from mocojax.evaluation import features as features_lib
  from mocojax.hand_off import pretraining_run

  mesh = parallel.make_mesh()
  backbone = pretraining_run.restore_backbone(workdir, mesh=mesh)
  d = backbone.config.data
  source = sources.get_source(d, d.eval_split)
  batch = backbone.config.eval.batch_size
  batches = pipeline.eval_batches(source, sharding=parallel.batch_sharding(mesh),
                                  global_batch=batch, image_size=d.image_size, mean=d.mean,
                                  std=d.std, num_batches=-(-num_points // batch))
  feats, labels, mask = features_lib.extract_features(backbone.features, backbone.variables,
                                                      batches, mesh=mesh)
  keep = np.asarray(jax.device_get(mask))
  feats = np.asarray(jax.device_get(feats))[keep][:num_points]
  labels = np.asarray(jax.device_get(labels))[keep][:num_points]
  return feats / np.linalg.norm(feats, axis=1, keepdims=True), labels, backbone.step


def write_embedding(workdir: str, num_points: int = 2000, out_name: str = 'features_tsne.png'):
  import jax
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  from mocojax.evaluation import embedding

  feats, labels, step = test_features(workdir, num_points)
  y = jax.device_get(embedding.tsne(feats, jax.random.key(0)))
  fig, ax = plt.subplots(figsize=(7, 7))
  scatter = ax.scatter(y[:, 0], y[:, 1], c=labels, cmap='tab10', s=4)
  ax.legend(*scatter.legend_elements(), title='class', loc='best', fontsize=8)
  ax.set(title=f't-SNE of backbone features, {len(labels)} test images, step {step}',
         xticks=[], yticks=[])
  path = os.path.join(workdir, out_name)
  fig.savefig(path, dpi=100, bbox_inches='tight')
  plt.close(fig)
  return path


def log_images(workdir: str, paths: list):
  """Adds the PNGs to the run's TensorBoard events (at the last logged step)."""
  import matplotlib.image
  import numpy as np
  from clu import metric_writers

  step = max((r['step'] for r in read_metrics(workdir)), default=0)
  writer = metric_writers.create_default_writer(workdir)
  images = {f'report/{os.path.splitext(os.path.basename(p))[0]}':
            (np.asarray(matplotlib.image.imread(p))[None, ..., :3] * 255).astype(np.uint8)
            for p in paths}
  writer.write_images(step, images)
  writer.flush()


def main(argv):
  del argv
  paths = [write_plots(flags.FLAGS.workdir)]
  if flags.FLAGS.embedding:
    paths.append(write_embedding(flags.FLAGS.workdir, flags.FLAGS.embedding_points))
  log_images(flags.FLAGS.workdir, paths)
  print('\n'.join(paths))


if __name__ == '__main__':
  # Defined here, not at import: the trainer imports this module next to its own flags.
  flags.DEFINE_string('workdir', None, 'A training run directory.', required=True)
  flags.DEFINE_bool('embedding', True, 't-SNE of test features from the latest checkpoint.')
  flags.DEFINE_integer('embedding_points', 2000, 'Test images in the t-SNE.')
  app.run(main)
