"""The instability alarm: gradient spikes and kNN dips, the MoCo v3 paper's signals (Figs. 4-5).

A *gradient spike* is a layer group whose gradient infinity-norm rises above `spike_factor` x
its running median (over its last `spike_window` observations, once it has `spike_warmup` of
them). One spike event starts at the first group to rise (the input-most one, if several rise
together) and follows the rise through the network: it ends when the last backbone block rises
(its lag, in steps, is the paper's "the spike reaches the last layers tens of steps later"), or
`spike_horizon` steps after it began without reaching it. A group counts when it *rises* above
its threshold, not while it stays there, so one long spike is one event.

A *kNN dip* is a kNN top-1 more than `dip_points` points (accuracy x 100) below the best so far;
the curve has to come back within `dip_points` of its best (or set a new best) before the next
dip counts.

The alarm reads the rows the trainer writes to metrics.jsonl (`Alarm.observe`), so the same
rows replayed later (`replay_rows`, for plots and the sweep table) give the same events. A row
is a log interval's mean: a one-step spike is diluted by the interval's length, and lags are
multiples of it. Run with log_every_steps=1 to see single-step spikes and exact lags.
"""

import collections
import dataclasses
import re

import numpy as np

# Tuned on Fashion-MNIST ViTs logged every step: their per-step infinity-norms stay within
# ~2-3x of their median outside instabilities, so 5x leaves noise alone; 100 steps is long
# enough for a median that one spike cannot move and short enough to follow the lr schedule.
DEFAULTS = dict(
    spike_factor=5.0,    # a spike: above this x the group's running median
    spike_window=100,    # observations in the running median
    spike_warmup=10,     # observations a group needs before it can spike
    spike_horizon=50,    # steps a spike has to reach the last backbone block
    dip_points=1.0,      # a dip: this many accuracy points (x 100) below the best so far
)

GRAD_PREFIX = 'grad_inf/'
KNN_PREFIX = 'knn/top1@'
_LAST_BLOCK = re.compile(r'backbone/(?:blocks_\d+|layer\d+_\d+)')


def settings(config=None) -> dict:
  """The alarm's settings: DEFAULTS overridden by a config's `stability` block (or a dict)."""
  out = dict(DEFAULTS)
  if config is not None:
    given = config.to_dict() if hasattr(config, 'to_dict') else dict(config)
    unknown = sorted(set(given) - set(DEFAULTS))
    if unknown:
      raise ValueError(f'config.stability has unknown fields {unknown}; known: {sorted(DEFAULTS)}.')
    out.update({k: v for k, v in given.items() if v is not None})
  return out


def last_block(layer_groups) -> str | None:
  """The backbone's last block among the layer groups (input-to-output order), if any."""
  blocks = [g for g in layer_groups if _LAST_BLOCK.fullmatch(g)]
  return blocks[-1] if blocks else None


@dataclasses.dataclass(frozen=True)
class Spike:
  step: int                 # the step the first group rose at
  group: str                # that group (the input-most, if several rose at once)
  ratio: float              # its infinity-norm / its running median then
  groups: tuple             # every group that rose during the event, in order of rising
  last_block: str | None    # the group the lag is measured to
  lag: int | None           # steps until last_block rose; None if it did not within the horizon
  horizon: int
  kind = 'spike'

  @property
  def message(self) -> str:
    where = f'step {self.step}: gradient spike in {self.group} ({self.ratio:.0f}x its median)'
    if self.last_block is None:
      return f'{where}, {len(self.groups)} layer groups rose'
    if self.lag is None:
      return (f'{where}, did not reach {self.last_block} within {self.horizon} steps '
              f'({len(self.groups)} layer groups rose)')
    if self.group == self.last_block:
      return where
    if self.lag == 0:
      return f'{where}, in {self.last_block} at the same step'
    return f'{where}, reached {self.last_block} {self.lag} steps later'

  def scalars(self, layer_groups) -> dict:
    """Numbers for TensorBoard and metrics.jsonl (which hold floats only)."""
    out = {'alarm/spike': 1.0, 'alarm/spike_step': float(self.step),
           'alarm/spike_group': float(list(layer_groups).index(self.group)),
           'alarm/spike_ratio': self.ratio}
    if self.lag is not None:
      out['alarm/spike_lag'] = float(self.lag)
    return out


@dataclasses.dataclass(frozen=True)
class Dip:
  step: int
  key: str                  # e.g. 'knn/top1@20'
  accuracy: float           # fractions, as logged
  best: float
  best_step: int
  kind = 'dip'

  @property
  def points(self) -> float:
    return 100 * (self.best - self.accuracy)

  @property
  def message(self) -> str:
    return (f'step {self.step}: kNN dip, {self.key} {100 * self.accuracy:.1f}% is '
            f'{self.points:.1f} points below its best ({100 * self.best:.1f}% at step '
            f'{self.best_step})')

  def scalars(self, layer_groups=()) -> dict:
    del layer_groups
    return {'alarm/dip': 1.0, 'alarm/dip_points': self.points}


class Alarm:
  """Spike and dip detection over a run's logged rows; see the module docstring.

  `layer_groups` in input-to-output order (`models.layer_groups`). The kNN curve watched is
  `knn_key`, or the first `knn/top1@k` key of the first row that has one (the trainer writes
  them in config.eval.knn_ks order).
  """

  def __init__(self, layer_groups, spike_factor=DEFAULTS['spike_factor'],
               spike_window=DEFAULTS['spike_window'], spike_warmup=DEFAULTS['spike_warmup'],
               spike_horizon=DEFAULTS['spike_horizon'], dip_points=DEFAULTS['dip_points'],
               knn_key: str | None = None):
    self.layer_groups = tuple(layer_groups)
    self.spike_factor, self.spike_warmup = float(spike_factor), int(spike_warmup)
    self.spike_horizon, self.dip_points = int(spike_horizon), float(dip_points)
    self.knn_key = knn_key
    self.last_block = last_block(self.layer_groups)
    self._history = [collections.deque(maxlen=int(spike_window)) for _ in self.layer_groups]
    self._above = [False] * len(self.layer_groups)
    self._open = None        # the spike event being followed: dict(step, first, ratio, rose)
    self._best = None        # (accuracy, step)
    self._in_dip = False
    self.events = []

  @classmethod
  def from_config(cls, stability_config, layer_groups, knn_key=None) -> 'Alarm':
    return cls(layer_groups, knn_key=knn_key, **settings(stability_config))

  # -------------------------------------------------------------------------------- inputs
  def observe(self, step: int, row: dict) -> list:
    """Events that end at this logged row (its `grad_inf/<group>` and kNN values)."""
    events = []
    if any(k.startswith(GRAD_PREFIX) for k in row):
      values = [row.get(GRAD_PREFIX + g, np.nan) for g in self.layer_groups]
      events += self.observe_step(step, values)
    if self.knn_key is None:
      self.knn_key = next((k for k in row if k.startswith(KNN_PREFIX)), None)
    if self.knn_key in row:
      dip = self.observe_knn(step, row[self.knn_key])
      events += [dip] if dip else []
    return events

  def observe_step(self, step: int, grad_inf) -> list:
    """Feeds one vector of per-group infinity-norms; returns the spike events it ends."""
    events = []
    if self._open and step - self._open['step'] > self.spike_horizon:
      events.append(self._close(None))
    rose, ratios = [], {}
    for i, value in enumerate(np.asarray(grad_inf, np.float64)):
      if not np.isfinite(value):
        continue  # not logged, or diverged (the trainer stops on that)
      history = self._history[i]
      above = False
      if len(history) >= self.spike_warmup:
        median = float(np.median(history))
        # A group with no gradient (a frozen patch projection) has a zero median: never a spike.
        above = median > 0 and value > self.spike_factor * median
        if above and not self._above[i]:
          rose.append(i)
          ratios[i] = float(value / median)
      self._above[i] = above
      history.append(value)
    if rose and self._open is None:
      self._open = dict(step=step, first=rose[0], ratio=ratios[rose[0]], rose=[])
    if self._open is not None:
      self._open['rose'] += [i for i in rose if i not in self._open['rose']]
      if self.last_block is not None and self.layer_groups.index(self.last_block) in rose:
        events.append(self._close(step - self._open['step']))
    self.events += events
    return events

  def observe_knn(self, step: int, accuracy: float):
    """Feeds one kNN accuracy (a fraction); returns a Dip if the curve just fell into one."""
    accuracy = float(accuracy)
    if not np.isfinite(accuracy):
      return None
    if self._best is None or accuracy > self._best[0]:
      self._best, self._in_dip = (accuracy, step), False
      return None
    if 100 * (self._best[0] - accuracy) <= self.dip_points:
      self._in_dip = False
      return None
    if self._in_dip:
      return None
    self._in_dip = True
    dip = Dip(step=step, key=self.knn_key or '', accuracy=accuracy, best=self._best[0],
              best_step=self._best[1])
    self.events.append(dip)
    return dip

  def finish(self) -> list:
    """At the end of a run: the spike still being followed, as one that did not arrive."""
    events = [self._close(None)] if self._open else []
    self.events += events
    return events

  def replay(self, rows) -> list:
    """Feeds logged rows in order (e.g. to resume an alarm); returns the events they give."""
    events = []
    for row in rows:
      if 'step' in row:
        events += self.observe(int(row['step']), row)
    return events

  # ------------------------------------------------------------------------------- outputs
  def _close(self, lag) -> Spike:
    o, self._open = self._open, None
    return Spike(step=o['step'], group=self.layer_groups[o['first']], ratio=o['ratio'],
                 groups=tuple(self.layer_groups[i] for i in o['rose']),
                 last_block=self.last_block, lag=lag, horizon=self.spike_horizon)

  def summary(self) -> dict:
    spikes = [e for e in self.events if e.kind == 'spike']
    return dict(spikes=len(spikes), dips=sum(e.kind == 'dip' for e in self.events),
                spikes_reaching_last_block=sum(e.lag is not None for e in spikes))


def layer_groups_of(rows) -> list:
  """The layer groups of logged rows, in input-to-output order (the trainer's order)."""
  from mocojax import models  # the ordering rule of models.layer_groups
  names = {k[len(GRAD_PREFIX):]: None for r in rows for k in r if k.startswith(GRAD_PREFIX)}
  return models.order_layer_groups(names)


def replay_rows(rows, stability_config=None) -> Alarm:
  """The alarm of a whole logged run, offline: the events the trainer raised, and a spike still
  being followed at the end (as one that did not arrive). `rows` as read from metrics.jsonl."""
  alarm = Alarm.from_config(stability_config, layer_groups_of(rows))
  alarm.replay(rows)
  alarm.finish()
  return alarm
