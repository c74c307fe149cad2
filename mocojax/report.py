"""Plots of a run: `python -m mocojax.report --workdir=runs/demo`.

Reads `metrics.jsonl` (written by the trainer next to the TensorBoard events) and writes
`training.png`: loss; kNN top-1 against epoch; learning rate and momentum; and the
infinity-norm of the first-layer and last-block gradients on a log scale, the signals the
MoCo v3 paper (Fig. 5) used to find its instabilities, with the gradient spikes and kNN dips of
the instability alarm (mocojax/stability.py) marked; and, when the run logged every layer
group's gradient, `grad_layers.png`: their log10 infinity-norms as a layers x steps heatmap,
each spike drawn from the layer it began in to the last block it reached. With --embedding
(default) it also restores the latest checkpoint's backbone and writes `features_tsne.png`: a
2-D t-SNE of the features of the first --embedding_points test images, coloured by class. The
PNGs are logged to TensorBoard as images too.
"""

import json
import os

from absl import app, flags


def read_metrics(workdir: str) -> list:
  from mocojax import metrics_log
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    raise FileNotFoundError(f'No metrics at {path}: is --workdir the directory of a training run?')
  return metrics_log.read_rows(path)


def _series(rows, key, x='step'):
  pts = [(r[x], r[key]) for r in rows if key in r and x in r]
  # A resumed run may re-log steps; the latest value for a step wins.
  return zip(*sorted(dict(pts).items())) if pts else ((), ())


def stability_config(workdir: str):
  """The run's config.stability (thresholds of the alarm), or None for the defaults."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f).get('stability')


def alarm_of(workdir: str, rows=None):
  """The run's spikes and dips, recomputed from its metrics as the trainer raised them."""
  from mocojax import stability
  return stability.replay_rows(read_metrics(workdir) if rows is None else rows,
                               stability_config(workdir))


def write_plots(workdir: str, out_name: str = 'training.png') -> list:
  """Writes `out_name` and, when the run logged per-layer gradients, grad_layers.png."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  import numpy as np

  rows = read_metrics(workdir)
  alarm = alarm_of(workdir, rows)
  spikes = [e for e in alarm.events if e.kind == 'spike']
  dips = [e for e in alarm.events if e.kind == 'dip']
  # Steps to epochs for the kNN panel, from the rows that have both.
  step_xs, epoch_ys = (np.asarray(v, float) for v in _series(rows, 'epoch'))

  def epoch_of(step):
    return float(np.interp(step, step_xs, epoch_ys)) if len(step_xs) else float('nan')

  def mark_spikes(ax, x=lambda s: s):
    for i, e in enumerate(spikes):
      ax.axvline(x(e.step), color='tab:red', alpha=0.35, lw=1,
                 label='gradient spike' if i == 0 else None)

  fig, axes = plt.subplots(2, 2, figsize=(12, 8))
  ax = axes[0, 0]
  ax.plot(*_series(rows, 'loss'), label='loss')
  mark_spikes(ax)
  ax.set(title='MoCo loss', xlabel='step', ylabel='loss')
  if spikes:
    ax.legend()

  ax = axes[0, 1]
  knn_keys = sorted({k for r in rows for k in r if k.startswith('knn/')})
  acc_keys = knn_keys + (['probe/test_top1'] if any('probe/test_top1' in r for r in rows) else [])
  for key in acc_keys:
    xs, ys = _series(rows, key, x='epoch')
    label = key.replace('knn/top1@', 'kNN k=').replace('probe/test_top1', 'online linear probe')
    ax.plot(xs, [100 * y for y in ys], marker='o', label=label)
  mark_spikes(ax, epoch_of)
  if dips:
    ax.scatter([epoch_of(d.step) for d in dips], [100 * d.accuracy for d in dips], s=120,
               facecolors='none', edgecolors='tab:red', linewidths=2, zorder=3,
               label=f'kNN dip (> {alarm.dip_points:g} points below the best)')
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
  mark_spikes(ax)
  ax.set_yscale('log')
  ax.set(title=f'gradient inf-norm: {len(spikes)} spikes (> {alarm.spike_factor:g}x median), '
               f'{len(dips)} kNN dips', xlabel='step')
  ax.legend()

  fig.suptitle(os.path.basename(os.path.normpath(workdir)))
  fig.tight_layout()
  path = os.path.join(workdir, out_name)
  fig.savefig(path, dpi=100)
  plt.close(fig)
  paths = [path]
  if alarm.layer_groups:
    paths.append(write_grad_layers(workdir, rows, alarm))
  return paths


def write_grad_layers(workdir: str, rows, alarm, out_name: str = 'grad_layers.png') -> str:
  """Layers x steps heatmap of log10 gradient infinity-norms (the v3 paper's Fig. 5), input
  layers at the top, with the alarm's spikes: where each began and where it reached the last
  block. A frozen layer (no gradient) is blank."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  import numpy as np

  from mocojax import stability

  groups = alarm.layer_groups
  by_step = {}
  for r in rows:  # the latest row of a step wins, as in _series
    if 'step' in r and any(k.startswith(stability.GRAD_PREFIX) for k in r):
      by_step[r['step']] = r
  steps = np.asarray(sorted(by_step), float)
  values = np.asarray([[by_step[s].get(stability.GRAD_PREFIX + g, np.nan) for s in sorted(by_step)]
                       for g in groups], float)
  with np.errstate(divide='ignore', invalid='ignore'):
    logs = np.where(values > 0, np.log10(values), np.nan)
  # Cell edges halfway between logged steps (uneven after a resume or at the last step).
  mid = (steps[1:] + steps[:-1]) / 2
  first = steps[0] - (mid[0] - steps[0] if len(mid) else 0.5)
  last = steps[-1] + (steps[-1] - mid[-1] if len(mid) else 0.5)
  edges = np.concatenate([[first], mid, [last]])

  fig, ax = plt.subplots(figsize=(12, 1.5 + 0.32 * len(groups)))
  mesh = ax.pcolormesh(edges, np.arange(len(groups) + 1) - 0.5, np.ma.masked_invalid(logs),
                       cmap='viridis', shading='flat')
  fig.colorbar(mesh, ax=ax, label='log10 gradient infinity-norm', pad=0.01)
  ax.set_yticks(range(len(groups)), [g.removeprefix('backbone/') for g in groups])
  ax.invert_yaxis()  # input at the top, as the network reads
  row = {g: i for i, g in enumerate(groups)}
  spikes = [e for e in alarm.events if e.kind == 'spike']
  for i, e in enumerate(spikes):
    ax.plot([e.step], [row[e.group]], marker='o', ms=9, mfc='none', mec='red', mew=2,
            ls='none', label='spike begins' if i == 0 else None)
    if e.lag is not None and e.group != e.last_block:
      ax.annotate('', xy=(e.step + e.lag, row[e.last_block]), xytext=(e.step, row[e.group]),
                  arrowprops=dict(arrowstyle='->', color='red', lw=1.5))
  for i, e in enumerate(d for d in alarm.events if d.kind == 'dip'):
    ax.axvline(e.step, color='white', ls='--', lw=1, label='kNN dip' if i == 0 else None)
  reached = sum(e.lag is not None for e in spikes)
  ax.set(xlabel='step', title=f'gradient infinity-norm per layer group: {len(spikes)} spikes, '
                              f'{reached} reached the last block')
  if alarm.events:
    ax.legend(loc='upper right', fontsize=8)
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
  paths = write_plots(flags.FLAGS.workdir)
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
