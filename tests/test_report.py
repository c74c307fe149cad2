"""report.write_plots from synthetic metrics.jsonl files: with per-layer gradients (heatmap,
spikes and dips marked) and without (a run logged before they existed)."""

import json

import matplotlib.image
import numpy as np

from mocojax import metrics_log, report

GROUPS = ('backbone/patch_embed', 'backbone/cls_token', 'backbone/blocks_0', 'backbone/blocks_1',
          'backbone/norm', 'projector', 'predictor')


def _synthetic_run(workdir, per_layer=True):
  rng = np.random.default_rng(0)
  log = metrics_log.MetricsLog(str(workdir / 'metrics.jsonl'))
  knn = {100: 0.60, 200: 0.70, 300: 0.64, 400: 0.72}
  for step in range(1, 401):
    grads = 0.1 * np.exp(0.2 * rng.standard_normal(len(GROUPS)))
    if step in (150, 151):
      grads[0] *= 50           # rises in the patch projection ...
    if step in (158, 159):
      grads[3] *= 50           # ... and reaches the last block 8 steps later
    row = {'loss': 3.0 - step / 400, 'lr': 1e-3, 'momentum': 0.99,
           'grad_max/first_layer': grads[0], 'grad_max/last_block': grads[3],
           'epoch': step / 100}
    if per_layer:
      # Keys in a shuffled order: the plots order the layers input to output themselves.
      row.update({f'grad_inf/{GROUPS[i]}': grads[i] for i in rng.permutation(len(GROUPS))})
    log.write(step, row)
    if step in knn:
      log.write(step, {'knn/top1@20': knn[step], 'knn/top1@200': knn[step] - 0.01,
                       'epoch': step / 100})


def _image(path):
  image = matplotlib.image.imread(path)
  assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 500
  return image


def test_plots_with_per_layer_gradients(tmp_path):
  _synthetic_run(tmp_path)
  paths = report.write_plots(str(tmp_path))
  assert [p.rsplit('/', 1)[1] for p in paths] == ['training.png', 'grad_layers.png']
  for p in paths:
    _image(p)
  alarm = report.alarm_of(str(tmp_path))
  assert alarm.layer_groups == GROUPS
  assert [(e.kind, e.step) for e in alarm.events] == [('spike', 150), ('dip', 300)]
  assert alarm.events[0].lag == 8
  # The run's own thresholds (config.json's stability block) are the ones replayed.
  (tmp_path / 'config.json').write_text(json.dumps({'stability': {'spike_factor': 100.0,
                                                                  'dip_points': 10.0}}))
  assert report.alarm_of(str(tmp_path)).events == []


def test_plots_of_a_run_without_per_layer_gradients(tmp_path):
  _synthetic_run(tmp_path, per_layer=False)
  [path] = report.write_plots(str(tmp_path))
  _image(path)
  assert not (tmp_path / 'grad_layers.png').exists()
