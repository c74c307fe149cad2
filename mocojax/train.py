"""The pretraining trainer: read it top to bottom.

  mesh -> input -> the step set up (step.setup: model, optimizer, schedules, shardings) ->
  state (the latest usable checkpoint, or created sharded) -> evaluators -> the loop (metrics,
  progress, divergence stop, preemption, saves, kNN).

The step itself, pure and jitted, lives in step.py.
"""

import contextlib
import functools
import os
import signal
import time

import jax
import numpy as np
import optax
from absl import logging
from clu import metric_writers, periodic_actions

from mocojax import checkpoint as ckpt_lib
from mocojax import metrics_log as metrics_log_lib
from mocojax import parallel
from mocojax import preemption
from mocojax import stability
from mocojax import step as step_lib
from mocojax import validate
from mocojax import workdir_lock
from mocojax.data import pipeline, sources
from mocojax.evaluation import features as features_lib
from mocojax.evaluation import knn as knn_lib
from mocojax.evaluation import online_probe


class DivergenceError(FloatingPointError):
  """The loss, a gradient or the parameters left their bounds; the state was not saved."""


def check_config(config):
  """Every bad setting at once, one line each, before any data is read or code compiled."""
  validate.check(config)


# ----------------------------------------------------------------------------------------------
# Evaluation: kNN on backbone features.
# ----------------------------------------------------------------------------------------------
def knn_evaluator(config, method, mesh, train_source, eval_source):
  """Returns state -> {'knn/top1@k': acc}; features are the base backbone's, inference mode."""
  def run(state):
    variables = {'params': state.params, 'batch_stats': state.batch_stats}
    (bf, bl, bm), (qf, ql, qm) = (
        features_lib.split_features(method.features, variables, source, data_config=config.data,
                                    batch_size=config.eval.batch_size, mesh=mesh)
        for source in (train_source, eval_source))
    acc = knn_lib.knn_accuracy(bf, bl, qf, ql, num_classes=train_source.num_classes,
                               ks=tuple(config.eval.knn_ks), temperature=config.eval.knn_temperature,
                               mesh=mesh, bank_mask=bm, query_mask=qm)
    out = {f'knn/top1@{k}': v for k, v in acc.items()}
    if state.probe is not None:
      out['probe/test_top1'] = float(online_probe.accuracy(state.probe['params'], qf, ql, qm))
    return out

  return run


def check_divergence(values: dict, step: int, *, layer_groups, guard, start_param_norm: float,
                     checkpoint_dir) -> None:
  """Raises DivergenceError if step `step` left the run's bounds; `values` are host metrics.

  Bounds: a finite loss and finite gradients (the first non-finite layer group is named); an
  update no larger than `guard.max_update_ratio` x the parameter norm; a parameter norm within
  `guard.max_param_norm_growth` x its value at step 0. 0 turns a guard off.
  """
  problems = []
  if not np.isfinite(values['loss']):
    problems.append(f'the loss is {values["loss"]}')
  grad_inf = values.get('grad_inf')
  if grad_inf is not None and not np.all(np.isfinite(grad_inf)):
    bad = [g for g, v in zip(layer_groups, grad_inf) if not np.isfinite(v)]
    problems.append(f'gradients are non-finite from {bad[0]} on ({len(bad)} of '
                    f'{len(layer_groups)} layer groups)')
  param_norm, update_norm = float(values['param_norm']), float(values['update_norm'])
  if not (np.isfinite(param_norm) and np.isfinite(update_norm)):
    problems.append(f'the parameter norm is {param_norm}, the update norm {update_norm}')
  elif guard.max_update_ratio and update_norm > guard.max_update_ratio * param_norm:
    problems.append(f'the update norm {update_norm:.3g} exceeds divergence.max_update_ratio='
                    f'{guard.max_update_ratio:g} x the parameter norm {param_norm:.3g}')
  elif guard.max_param_norm_growth and param_norm > guard.max_param_norm_growth * start_param_norm:
    problems.append(f'the parameter norm {param_norm:.3g} exceeds divergence.max_param_norm_growth'
                    f'={guard.max_param_norm_growth:g} x its value at step 0 '
                    f'({start_param_norm:.3g})')
  if problems:
    largest = ''
    if grad_inf is not None and np.all(np.isfinite(grad_inf)) and len(layer_groups):
      i = int(np.argmax(grad_inf))
      largest = f' The largest gradient is in {layer_groups[i]} ({grad_inf[i]:.3g}).'
    raise DivergenceError(
        f'Step {step} diverged: {"; ".join(problems)}.{largest} Nothing from it was saved. Lower '
        f'optimizer.base_lr, raise warmup_epochs, or loosen config.divergence; the last good '
        f'checkpoint is in {checkpoint_dir}.')


# ----------------------------------------------------------------------------------------------
# The loop.
# ----------------------------------------------------------------------------------------------
def train_and_evaluate(config, workdir: str) -> dict:
  """Pretrains per `config`, writing logs and checkpoints to `workdir`; returns final metrics.

  One run per workdir (a lock file); SIGTERM/SIGINT finish the step, save it and raise
  preemption.Preempted; rerunning the same call resumes from the latest usable checkpoint.
  """
  check_config(config)
  primary = jax.process_index() == 0
  with contextlib.ExitStack() as guards:
    if primary:
      os.makedirs(workdir, exist_ok=True)
      guards.enter_context(workdir_lock.WorkdirLock(workdir))
    watcher = guards.enter_context(preemption.Watcher())
    return _pretrain(config, workdir, watcher)


def _pretrain(config, workdir: str, watcher) -> dict:
  primary = jax.process_index() == 0
  writer = metric_writers.create_default_writer(workdir, just_logging=not primary)
  if primary:
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      f.write(config.to_json_best_effort(indent=2))

  # ---- Mesh.
  mesh = parallel.make_mesh(tuple(tuple(a) for a in config.mesh))

  # ---- Input.
  train_source = sources.get_source(config.data, config.data.train_split)
  steps_per_epoch = pipeline.steps_per_epoch(train_source, config.batch_size)

  # ---- The step: model, optimizer, schedules, state layout, jitted init and step.
  setup = step_lib.setup(config, mesh, steps_per_epoch, train_source.image_shape[-1],
                         train_source.num_classes)
  total_steps = setup.total_steps

  # ---- State: the latest usable checkpoint restored onto the state's shardings (its config
  # checked first; damaged checkpoints skipped), or created already sharded. Nothing has
  # compiled yet.
  checkpointer = ckpt_lib.Checkpointer(workdir, config, config.checkpoint_every_steps,
                                       config.keep_checkpoints,
                                       config.get('async_checkpointing', True))
  state, meta = checkpointer.resume(setup.abstract_state)
  if state is None:
    state = setup.init(jax.random.key(config.seed))
  else:
    logging.info('Resumed from %s at step %d.', checkpointer.directory, meta['step'])
  # The divergence guard's reference: the parameter norm at step 0, kept with every save.
  start_param_norm = (meta or {}).get('run', {}).get('start_param_norm') or float(
      jax.jit(optax.tree.norm)(state.params))
  start_step = int(jax.device_get(state.step))
  num_params = sum(x.size for x in jax.tree.leaves(state.params['backbone']))
  logging.info('Backbone parameters: %.2fM; steps: %d (%d per epoch); global batch %d on %d '
               'devices.', num_params / 1e6, total_steps, steps_per_epoch, config.batch_size,
               jax.device_count())

  # ---- Evaluators.
  evaluate = None
  knn_every = int(round(config.eval.knn_every_epochs * steps_per_epoch))
  if knn_every or config.eval.get('knn_at_end', True):
    eval_source = sources.get_source(config.data, config.data.eval_split)
    evaluate = knn_evaluator(config, setup.method, mesh, train_source, eval_source)

  # ---- Data, positioned at the step we resume from (batches are a function of (seed, step)).
  d = config.data
  # The host reads, decodes and crops; the devices finish the views (jitter, blur, ...).
  batches = pipeline.train_batches(
      train_source, sharding=setup.batch_sharding, global_batch=config.batch_size,
      seed=config.seed, start_step=start_step, image_size=d.image_size, recipe=d.recipe,
      crop_scale=tuple(d.crop_scale), mean=d.mean, std=d.std,
      augment_overrides={k: tuple(v) if isinstance(v, (list, tuple)) else v
                         for k, v in d.augment.items() if v is not None})

  # ---- Loop.
  stop_at = min(total_steps, config.get('stop_after_steps') or total_steps)
  hooks = []
  if primary:
    progress = periodic_actions.ReportProgress(num_train_steps=total_steps, writer=writer,
                                               every_steps=config.log_every_steps)
    hooks.append(progress)
  # Rows a killed run logged after its last checkpoint are dropped: each step appears once.
  metrics_log = metrics_log_lib.MetricsLog(os.path.join(workdir, 'metrics.jsonl'),
                                           resume_step=start_step, enabled=primary)
  pending, last, summary = [], None, {}
  t_log, step_log = time.time(), start_step
  input_wait = 0.0  # seconds the loop spent blocked on the input since the last log
  layer_groups = setup.layer_groups
  check = functools.partial(check_divergence, layer_groups=layer_groups, guard=config.divergence,
                            start_param_norm=start_param_norm,
                            checkpoint_dir=checkpointer.directory)
  checked = ('loss', 'param_norm', 'update_norm', 'grad_inf')

  # The instability alarm reads the rows as they are written; a resumed run first replays the
  # rows it keeps (their alarms were raised before).
  alarm = None
  if primary:
    alarm = stability.Alarm.from_config(config.get('stability'), layer_groups)
    alarm.replay(metrics_log_lib.read_rows(metrics_log.path))

  def raise_alarms(step, events):
    for e in events:
      logging.warning('Instability: %s', e.message)
      writer.write_scalars(step, e.scalars(layer_groups))
      metrics_log.write(step, e.scalars(layer_groups))

  def write(step, scalars):
    writer.write_scalars(step, scalars)
    metrics_log.write(step, scalars)
    if alarm is not None:
      raise_alarms(step, alarm.observe(step, scalars))

  def scalars_of(metrics):
    """Host scalars of one step; the per-layer vector becomes one scalar per layer group."""
    out = {k: v for k, v in metrics.items() if k != 'grad_inf'}
    if 'grad_inf' in metrics:
      out.update({f'grad_inf/{g}': v for g, v in zip(layer_groups, metrics['grad_inf'])})
    return out

  try:
    with metric_writers.ensure_flushes(writer):
      for step in range(start_step + 1, stop_at + 1):
        with jax.profiler.StepTraceAnnotation('train', step_num=step):
          t_wait = time.time()
          batch = next(batches)
          input_wait += time.time() - t_wait
          state, metrics = setup.step(state, batch)
        pending.append(metrics)
        # Check the previous step: the host stays one step behind the device.
        if last is not None:
          check(jax.device_get({k: last[k] for k in checked if k in last}), step - 1)
        last = metrics
        for h in hooks:
          h(step)
        preempted = watcher.requested(step)
        final = step == stop_at or preempted

        if step % config.log_every_steps == 0 or final:
          host = [scalars_of(m) for m in jax.device_get(pending)]
          # Means over the interval, but gradient infinity-norms keep their maximum: a one-step
          # spike stays visible (and alarms) however many steps a log row covers.
          scalars = {k: float((np.max if k.startswith(('grad_inf/', 'grad_max/')) else np.mean)(
              [m[k] for m in host])) for k in host[0]}
          dt = time.time() - t_log
          scalars['images_per_sec'] = (step - step_log) * config.batch_size / max(dt, 1e-9)
          # Share of the wall time the loop waited for input while the device ran the previous
          # step: an upper bound on the time the device sat idle for want of data.
          scalars['input_wait_fraction'] = input_wait / max(dt, 1e-9)
          scalars['epoch'] = step / steps_per_epoch
          write(step, scalars)
          summary.update(scalars)
          pending, t_log, step_log, input_wait = [], time.time(), step, 0.0

        if final or step % config.checkpoint_every_steps == 0:
          check(jax.device_get({k: metrics[k] for k in checked if k in metrics}), step)
          checkpointer.save(step, state, dict(seed=config.seed, next_step=step), force=True,
                            run=dict(start_param_norm=start_param_norm))
        if preempted:
          checkpointer.wait()
          name = signal.Signals(watcher.signum).name
          raise preemption.Preempted(
              f'{name}: saved step {step} of {total_steps} to {checkpointer.directory}; rerun the '
              'same command to resume.', watcher.signum)

        at_end = step == total_steps
        if evaluate and ((knn_every and step % knn_every == 0) or
                         (at_end and config.eval.get('knn_at_end', True))):
          t0 = time.time()
          scalars = evaluate(state)
          scalars['epoch'] = step / steps_per_epoch
          logging.info('step %d: %s (%.1fs)', step, scalars, time.time() - t0)
          write(step, scalars)
          summary.update(scalars)
          t_log, input_wait = time.time(), 0.0  # evaluation time does not count against images/s
        if at_end and alarm is not None:
          raise_alarms(step, alarm.finish())  # a spike still being followed
  except BaseException:
    # Wait for a save in flight, but never let its error hide the one that stopped the run.
    try:
      checkpointer.close()
    except Exception as e:  # pylint: disable=broad-except
      logging.error('Closing the checkpointer also failed: %s', e)
    raise
  checkpointer.close()
  if primary and config.get('plot', True):
    from mocojax import report  # matplotlib only when plotting
    report.write_plots(workdir)
  return summary
