"""The loop every trainer runs: pretraining (train.py), fine-tuning and the linear probe
(downstream/). Each trainer brings its state, pure step, batches and evaluators; what they
share lives here, so all three log, check, save, stop and evaluate alike:

  MetricsWriter  TensorBoard events and metrics.jsonl. A resumed run continues from its last
                 checkpoint, so whatever a killed run logged after it would appear twice: both
                 are first cut back to the step resumed from.
  check_step     the one finite-check policy: a step whose loss, gradients or parameters are
                 not finite (or, where a trainer sets a guard, leave its bounds) stops the run
                 with DivergenceError naming the step and the first parameter group whose
                 gradient is not finite. Nothing from that step is saved.
  Evaluator      `run(state) -> {name: value}`: the kNN monitor, the online probe, and the
                 probe's and fine-tuning's accuracies.
  Loop           steps start+1 .. stop: the host checks step t-1 while the device runs step t;
                 logs interval means (gradient maxima keep their maximum) with images/s, the
                 share of time spent waiting for input, and the epoch; saves every
                 `checkpoint_every` steps and at the end, checking the step first; on
                 SIGTERM/SIGINT saves the step and raises preemption.Preempted; runs the
                 evaluators at their intervals. Evaluations due at a preempted step are
                 skipped (the host has seconds to save) and run first when the run resumes.
"""

import dataclasses
import os
import signal
import time
from typing import Callable, Optional, Protocol, Sequence

import jax
import numpy as np
import tensorflow as tf
from absl import logging
from clu import metric_writers, periodic_actions

from mocojax import metrics_log as metrics_log_lib
from mocojax import preemption


class DivergenceError(FloatingPointError):
  """The loss, a gradient or the parameters left their bounds; the state was not saved."""


class Evaluator(Protocol):

  def run(self, state) -> dict:
    """Scalars (name -> value) of `state`; the names are logged as they are."""


# ----------------------------------------------------------------------------------------------
# Metrics: TensorBoard and metrics.jsonl, each step once.
# ----------------------------------------------------------------------------------------------
def cut_events_after(logdir: str, step: int) -> int:
  """Drops every TensorBoard event of a step after `step` from the event files in `logdir`.

  Each file is rewritten through a temporary one (a crash leaves the old file or the new one).
  A record cut short by a kill is dropped too. Returns the number of events dropped.
  """
  dropped_total = 0
  for path in tf.io.gfile.glob(os.path.join(logdir, 'events.out.tfevents.*')):
    kept, dropped = [], 0
    try:
      for record in tf.data.TFRecordDataset(path):
        raw = record.numpy()
        event = tf.compat.v1.Event.FromString(raw)
        if event.HasField('summary') and event.step > step:
          dropped += 1
        else:
          kept.append(raw)
    except tf.errors.DataLossError:
      dropped += 1
    if dropped:
      tmp = os.path.join(logdir, '.events_cut.tmp')
      with tf.io.TFRecordWriter(tmp) as f:
        for raw in kept:
          f.write(raw)
      tf.io.gfile.rename(tmp, path, overwrite=True)
      dropped_total += dropped
  return dropped_total


class MetricsWriter:
  """Scalars to TensorBoard (clu's writer) and to metrics.jsonl, process 0 only.

  `resume_step`: the step the run continues from (0 for a fresh run); rows and events of later
  steps, written by a run that was killed after its last checkpoint, are dropped first.
  """

  def __init__(self, logdir: str, resume_step: int = 0):
    primary = jax.process_index() == 0
    if primary and tf.io.gfile.exists(logdir):
      cut = cut_events_after(logdir, resume_step)
      if cut:
        logging.info('Dropped %d TensorBoard events after step %d (logged by the run before '
                     'it stopped).', cut, resume_step)
    self.jsonl = metrics_log_lib.MetricsLog(os.path.join(logdir, 'metrics.jsonl'),
                                            resume_step=resume_step, enabled=primary)
    self.tensorboard = metric_writers.create_default_writer(logdir, just_logging=not primary)

  def write(self, step: int, scalars: dict):
    # A copy: clu's asynchronous writer reads the dict later, on its own thread, and callers may
    # go on to update theirs (a run's summary does).
    self.tensorboard.write_scalars(step, dict(scalars))
    self.jsonl.write(step, scalars)

  def flush(self):
    self.tensorboard.flush()

  def close(self):
    self.tensorboard.close()


# ----------------------------------------------------------------------------------------------
# The finite check.
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Guard:
  """Pretraining's bounds beyond finiteness (0 turns one off): the update's norm at most
  `max_update_ratio` x the parameters' norm; the parameters' norm at most
  `max_param_norm_growth` x its value at step 0 (`start_param_norm`)."""
  max_update_ratio: float = 0.0
  max_param_norm_growth: float = 0.0
  start_param_norm: float = 0.0


def check_step(values: dict, step: int, *, groups: Sequence[str] = (),
               guard: Optional[Guard] = None, checkpoint_dir: str = '', advice: str) -> None:
  """Raises DivergenceError if step `step` is not finite or left the guard's bounds.

  `values` are host metrics of one step: 'loss' (a scalar, or one per group when the groups are
  independent heads), optionally 'grad_inf' (the gradient's infinity-norm per group, in the
  order of `groups`, input to output), 'param_norm' and 'update_norm'.
  """
  problems = []
  loss = np.atleast_1d(np.asarray(values['loss'], np.float64))
  if not np.all(np.isfinite(loss)):
    where = ''
    if loss.size > 1 and loss.size == len(groups):
      where = ' for ' + ', '.join(g for g, v in zip(groups, loss) if not np.isfinite(v))
    problems.append(f'the loss is {loss[~np.isfinite(loss)][0]}{where}')
  grad_inf = values.get('grad_inf')
  if grad_inf is not None and not np.all(np.isfinite(grad_inf)):
    bad = [g for g, v in zip(groups, grad_inf) if not np.isfinite(v)]
    problems.append(f'gradients are non-finite from {bad[0]} on ({len(bad)} of '
                    f'{len(groups)} parameter groups)')
  if 'param_norm' in values:
    param_norm, update_norm = float(values['param_norm']), float(values['update_norm'])
    guard = guard or Guard()
    if not (np.isfinite(param_norm) and np.isfinite(update_norm)):
      problems.append(f'the parameter norm is {param_norm}, the update norm {update_norm}')
    elif guard.max_update_ratio and update_norm > guard.max_update_ratio * param_norm:
      problems.append(f'the update norm {update_norm:.3g} exceeds divergence.max_update_ratio='
                      f'{guard.max_update_ratio:g} x the parameter norm {param_norm:.3g}')
    elif (guard.max_param_norm_growth and
          param_norm > guard.max_param_norm_growth * guard.start_param_norm):
      problems.append(f'the parameter norm {param_norm:.3g} exceeds divergence.'
                      f'max_param_norm_growth={guard.max_param_norm_growth:g} x its value at '
                      f'step 0 ({guard.start_param_norm:.3g})')
  if problems:
    largest = ''
    if grad_inf is not None and np.all(np.isfinite(grad_inf)) and len(groups):
      i = int(np.argmax(grad_inf))
      largest = f' The largest gradient is in {groups[i]} ({grad_inf[i]:.3g}).'
    last_good = f'; the last good checkpoint is in {checkpoint_dir}' if checkpoint_dir else ''
    raise DivergenceError(f'Step {step} diverged: {"; ".join(problems)}.{largest} Nothing from '
                          f'it was saved. {advice}{last_good}.')


# ----------------------------------------------------------------------------------------------
# The loop.
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Every:
  """Run `evaluator` every `steps` steps (0: never in between) and, with `at_end`, after the
  loop's last step."""
  evaluator: Evaluator
  steps: int = 0
  at_end: bool = True


def _interval_means(rows: list) -> dict:
  # Gradient infinity-norms keep their maximum: a one-step spike stays visible (and alarms)
  # however many steps a log row covers.
  return {k: float((np.max if k.startswith(('grad_inf/', 'grad_max/')) else np.mean)(
      [r[k] for r in rows])) for k in rows[0]}


@dataclasses.dataclass
class Loop:
  """Steps a state through `step_fn` (see the module docstring for what happens around it)."""
  writer: MetricsWriter
  steps_per_epoch: int
  examples_per_step: int               # images/s counts these per step
  log_every: int
  check: Callable[[dict, int], None]   # host values of one step -> raises DivergenceError
  checked: tuple                       # the metrics `check` reads
  checkpointer: Optional[object] = None  # checkpoint.Checkpointer; None: nothing is saved
  checkpoint_every: int = 0
  seed: int = 0
  save_extra: dict = dataclasses.field(default_factory=dict)  # kept with every save
  watcher: Optional[preemption.Watcher] = None
  # Vector metrics logged as one scalar per entry, '<metric>/<name>': metric -> entry names
  # (e.g. 'grad_inf' -> the layer groups; the probe's 'loss' -> its heads).
  vectors: dict = dataclasses.field(default_factory=dict)
  total_steps: int = 0                 # the run's length, for the progress line (steps/s, ETA)
  on_row: Optional[Callable[[int, dict], None]] = None  # after every row written (the alarm)

  def write(self, step: int, scalars: dict):
    self.writer.write(step, scalars)
    if self.on_row is not None:
      self.on_row(step, scalars)

  def scalars_of(self, metrics: dict) -> dict:
    out = {}
    for k, v in metrics.items():
      if k in self.vectors:
        out.update({f'{k}/{name}': x for name, x in zip(self.vectors[k], v)})
      else:
        out[k] = v
    return out

  def _check(self, metrics, step: int):
    self.check(jax.device_get({k: metrics[k] for k in self.checked if k in metrics}), step)

  def run(self, state, step_fn, batches, *, start_step: int, stop_at: int,
          evaluators: Sequence[Every] = (), evaluations_pending: bool = False):
    """Runs steps start_step+1 .. stop_at; returns (state, summary of the last values).

    `evaluations_pending` (`evaluations_pending(meta)` of the checkpoint resumed from): the run
    before was preempted at start_step after saving it, so the evaluations due there did not
    run (a preempted host saves and exits at once); they run first.
    """
    def due(step):
      return [e for e in evaluators
              if (e.steps and step % e.steps == 0) or (e.at_end and step == stop_at)]

    pending, last, summary = [], None, {}
    if evaluations_pending and due(start_step):
      summary = self._evaluate(state, start_step, due(start_step))
    t_log, step_log, input_wait = time.time(), start_step, 0.0
    progress = None
    if self.total_steps and jax.process_index() == 0:
      # Every log_every steps: steps/s, % done and the ETA, in the log and TensorBoard.
      progress = periodic_actions.ReportProgress(
          num_train_steps=self.total_steps, writer=self.writer.tensorboard,
          every_steps=self.log_every)
    for step in range(start_step + 1, stop_at + 1):
      with jax.profiler.StepTraceAnnotation('train', step_num=step):
        t_wait = time.time()
        batch = next(batches)
        input_wait += time.time() - t_wait
        state, metrics = step_fn(state, batch)
      pending.append(metrics)
      # Check the previous step: the host stays one step behind the device.
      if last is not None:
        self._check(last, step - 1)
      last = metrics
      if progress is not None:
        progress(step)
      preempted = self.watcher is not None and self.watcher.requested(step)
      final = step == stop_at or preempted

      if step % self.log_every == 0 or final:
        scalars = _interval_means([self.scalars_of(m) for m in jax.device_get(pending)])
        dt = max(time.time() - t_log, 1e-9)
        scalars['images_per_sec'] = (step - step_log) * self.examples_per_step / dt
        # Share of the wall time the loop waited for input while the device ran the previous
        # step: an upper bound on the time the device sat idle for want of data.
        scalars['input_wait_fraction'] = input_wait / dt
        scalars['epoch'] = step / self.steps_per_epoch
        self.write(step, scalars)
        summary.update(scalars)
        pending, t_log, step_log, input_wait = [], time.time(), step, 0.0

      evaluations = due(step)
      if final or (self.checkpoint_every and step % self.checkpoint_every == 0):
        self._check(metrics, step)
        if self.checkpointer is not None:
          position = dict(seed=self.seed, next_step=step)
          if preempted and evaluations:
            position['evaluations_pending'] = True  # see evaluations_pending()
          self.checkpointer.save(step, state, position, force=True, **self.save_extra)
      if preempted:
        directory = getattr(self.checkpointer, 'directory', None)
        if self.checkpointer is not None:
          self.checkpointer.wait()
        name = signal.Signals(self.watcher.signum).name
        saved = (f'saved step {step} of {stop_at} to {directory}' if directory
                 else f'stopped at step {step} of {stop_at}, nothing to save')
        raise preemption.Preempted(f'{name}: {saved}; rerun the same command to resume.',
                                   self.watcher.signum)

      if evaluations:
        summary.update(self._evaluate(state, step, evaluations))
        t_log, input_wait = time.time(), 0.0  # evaluation time does not count against images/s
    return state, summary

  def _evaluate(self, state, step: int, due: Sequence[Every]) -> dict:
    t0 = time.time()
    scalars = {}
    for e in due:
      scalars.update(e.evaluator.run(state))
    scalars['epoch'] = step / self.steps_per_epoch
    logging.info('step %d: %s (%.1fs)', step, scalars, time.time() - t0)
    self.write(step, scalars)
    return scalars


def evaluations_pending(meta) -> bool:
  """Whether the checkpoint of `meta` (Checkpointer.resume) was saved by a preempted run before
  the evaluations due at its step ran; pass it to Loop.run."""
  return bool(((meta or {}).get('data') or {}).get('evaluations_pending'))
