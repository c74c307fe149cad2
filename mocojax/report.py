"""Plots of a run's metrics: `python -m mocojax.report --workdir=runs/demo`.

Reads `metrics.jsonl` (written by the trainer next to the TensorBoard events) and writes
`training.png`: loss; kNN top-1 against epoch; learning rate and momentum; and the
infinity-norm of the first-layer and last-block gradients on a log scale, the signals the
MoCo v3 paper (Fig. 5) used to find its instabilities.
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


def main(argv):
  del argv
  print(write_plots(flags.FLAGS.workdir))


if __name__ == '__main__':
  # Defined here, not at import: the trainer imports this module next to its own flags.
  flags.DEFINE_string('workdir', None, 'A training run directory.', required=True)
  app.run(main)
