"""The instability alarm on synthetic gradient and kNN series; online (as the trainer logs) and
offline (replayed from metrics.jsonl) give the same events."""

import random

import ml_collections
import numpy as np
import pytest

from mocojax import metrics_log, models, stability

GROUPS = ('backbone/patch_embed', 'backbone/cls_token', 'backbone/blocks_0', 'backbone/blocks_1',
          'backbone/blocks_2', 'backbone/blocks_3', 'backbone/norm', 'projector', 'predictor')
BASE = np.array([0.02, 0.5, 0.3, 0.2, 0.15, 0.1, 0.1, 0.4, 0.2])


def _noisy(steps, seed=0):
  """Per-step infinity-norms: each group's base with log-normal noise (about +-35%)."""
  rng = np.random.default_rng(seed)
  return BASE * np.exp(0.3 * rng.standard_normal((steps, len(GROUPS))))


def _inject(series, start, lag, factor=30.0, width=3):
  """A spike rising in the patch projection at step `start` (row start - 1) and in each block
  after it, reaching the last block `lag` steps later; each group stays high for `width` steps."""
  out = series.copy()
  hit = [0, 2, 3, 4, 5]  # patch_embed, then blocks_0 .. blocks_3
  for n, g in enumerate(hit):
    at = start + round(lag * n / (len(hit) - 1))
    out[at - 1:at - 1 + width, g] *= factor
  return out


def _run(series, **kw):
  alarm = stability.Alarm(GROUPS, **kw)
  for step, values in enumerate(series, start=1):
    alarm.observe_step(step, values)
  alarm.finish()
  return alarm


def test_flat_noisy_series_has_no_spike():
  alarm = _run(_noisy(600))
  assert alarm.summary() == dict(spikes=0, dips=0, spikes_reaching_last_block=0)


@pytest.mark.parametrize('lag', [0, 7, 23])
def test_spike_from_the_patch_projection_is_followed_to_the_last_block(lag):
  alarm = _run(_inject(_noisy(400), start=250, lag=lag))
  [spike] = alarm.events
  assert (spike.kind, spike.step, spike.group, spike.lag) == ('spike', 250, GROUPS[0], lag)
  assert spike.last_block == 'backbone/blocks_3'
  assert spike.ratio > 10
  if lag:
    assert spike.groups == (GROUPS[0],) + GROUPS[2:6]
    assert spike.message.startswith('step 250: gradient spike in backbone/patch_embed (')
    assert spike.message.endswith(f'reached backbone/blocks_3 {lag} steps later')


def test_spike_that_never_reaches_the_last_block_ends_at_the_horizon():
  series = _noisy(400)
  series[199:201, 0] *= 40  # steps 200 and 201
  alarm = stability.Alarm(GROUPS, spike_horizon=30)
  ended = {}
  for step, values in enumerate(series, start=1):
    for e in alarm.observe_step(step, values):
      ended[step] = e
  [(step, spike)] = ended.items()
  assert step == 231 and spike.lag is None and spike.groups == (GROUPS[0],)
  assert 'did not reach backbone/blocks_3 within 30 steps' in spike.message


def test_two_spikes_are_two_events_and_a_frozen_layer_never_spikes():
  series = _inject(_inject(_noisy(600), start=200, lag=10), start=400, lag=5)
  series[:, 0] = 0.0  # a frozen patch projection: no gradient at all
  alarm = _run(series)
  # Without the projection each spike starts in the first block, a quarter of its lag later.
  assert [(e.step, e.group, e.lag) for e in alarm.events] == [
      (202, 'backbone/blocks_0', 8), (401, 'backbone/blocks_0', 4)]


def test_warmup_observations_never_spike():
  series = _noisy(50)
  series[3, 0] *= 100  # before the group has spike_warmup observations
  assert _run(series, spike_warmup=10).events == []
  assert [e.step for e in _run(series, spike_warmup=2).events] == [4]


def _knn(alarm, curve):
  return [d for step, acc in enumerate(curve, start=1) if (d := alarm.observe_knn(step, acc))]


def test_knn_dips():
  alarm = stability.Alarm(GROUPS, dip_points=1.0, knn_key='knn/top1@20')
  # 3.5 points below the best of 0.735 for two evaluations: one dip; back up, then a new one.
  dips = _knn(alarm, [0.50, 0.62, 0.70, 0.735, 0.70, 0.71, 0.74, 0.745, 0.72])
  assert [(d.step, round(d.points, 6), d.best_step) for d in dips] == [(5, 3.5, 4), (9, 2.5, 8)]
  assert dips[0].message == ('step 5: kNN dip, knn/top1@20 70.0% is 3.5 points below its best '
                             '(73.5% at step 4)')
  assert alarm.summary()['dips'] == 2
  # Drops of less than d points are noise.
  assert _knn(stability.Alarm(GROUPS, dip_points=1.0), [0.5, 0.7, 0.695, 0.705, 0.699]) == []
  assert len(_knn(stability.Alarm(GROUPS, dip_points=0.4), [0.5, 0.7, 0.695])) == 1


def test_settings_from_a_config():
  c = ml_collections.ConfigDict(dict(spike_factor=8.0, spike_window=50, dip_points=2.0))
  alarm = stability.Alarm.from_config(c, GROUPS)
  assert (alarm.spike_factor, alarm.dip_points) == (8.0, 2.0)
  assert alarm._history[0].maxlen == 50
  assert stability.settings(None) == stability.DEFAULTS
  with pytest.raises(ValueError, match='spike_fcator'):
    stability.settings(dict(spike_fcator=3))


def test_layer_groups_are_ordered_from_input_to_output():
  for groups in (GROUPS + ('backbone/blocks_10',),
                 ('backbone/conv1', 'backbone/bn1', 'backbone/layer1_0', 'backbone/layer1_2',
                  'backbone/layer2_0', 'backbone/layer4_2', 'head')):
    shuffled = list(groups)
    random.Random(0).shuffle(shuffled)
    params = {top: {} for top in ('backbone', 'projector', 'predictor', 'head')}
    for g in groups:
      top, _, child = g.partition('/')
      if child:
        params[top][child] = 0
    params = {k: v for k, v in params.items() if v or k in groups}
    assert models.order_layer_groups(shuffled) == models.layer_groups(params)
  assert stability.last_block(models.order_layer_groups(GROUPS + ('backbone/blocks_10',))) == \
      'backbone/blocks_10'


def _write_run(path, series, knn, log_every, alarm=None, start=0):
  """Writes metrics.jsonl as the trainer does (interval means every `log_every` steps, kNN rows
  at their steps, alarm rows when events end), observing each row with `alarm` if given."""
  log = metrics_log.MetricsLog(path, resume_step=start)
  events = []

  def write(step, row):
    log.write(step, row)
    if alarm is not None:
      for e in alarm.observe(step, row):
        events.append(e)
        log.write(step, e.scalars(GROUPS))

  for step in range(start + 1, len(series) + 1):
    if step % log_every == 0:
      mean = series[step - log_every:step].mean(axis=0)
      write(step, {'loss': 1.0, **{f'grad_inf/{g}': v for g, v in zip(GROUPS, mean)},
                   'epoch': step / 100})
    if step in knn:
      write(step, {'knn/top1@20': knn[step], 'knn/top1@200': knn[step] - 0.02,
                   'epoch': step / 100})
  return events


@pytest.mark.parametrize('log_every', [1, 4])
def test_online_equals_offline(tmp_path, log_every):
  series = _inject(_inject(_noisy(800, seed=1), start=300, lag=12, factor=60, width=8),
                   start=600, lag=40, factor=60, width=8)
  knn = {100: 0.6, 200: 0.7, 300: 0.72, 400: 0.65, 500: 0.74, 600: 0.745, 700: 0.7, 800: 0.75}
  path = str(tmp_path / 'metrics.jsonl')
  online = stability.Alarm(GROUPS)
  events = _write_run(path, series, knn, log_every, online)
  events += online.finish()
  assert [e.kind for e in events].count('dip') == 2
  assert [e.kind for e in events].count('spike') >= 2
  offline = stability.replay_rows(metrics_log.read_rows(path))
  assert offline.layer_groups == GROUPS
  assert offline.events == events
  assert offline.summary() == online.summary()

  # A run resumed at step 450 replays the rows it kept and raises the rest as it goes.
  resumed_path = str(tmp_path / 'resumed.jsonl')
  _write_run(resumed_path, series[:480], knn, log_every, stability.Alarm(GROUPS))
  log_kept = metrics_log.MetricsLog(resumed_path, resume_step=450)
  del log_kept
  resumed = stability.Alarm(GROUPS)
  before = resumed.replay(metrics_log.read_rows(resumed_path))
  after = _write_run(resumed_path, series, knn, log_every, resumed, start=450) + resumed.finish()
  assert before + after == events
  assert stability.replay_rows(metrics_log.read_rows(resumed_path)).events == events
