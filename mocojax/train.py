"""The pretraining trainer: read it top to bottom.

  mesh -> input -> the step set up (step.setup: model, optimizer, schedules, shardings) ->
  state (the latest usable checkpoint, or created sharded) -> data -> evaluators (kNN, online
  probe) -> metrics and the instability alarm -> the loop (loop.Loop: logging, progress, the
  divergence stop, preemption, saves, evaluations).

The step itself, pure and jitted, lives in step.py; the loop's plumbing, shared with
fine-tuning and the linear probe, in loop.py.
"""

import contextlib
import functools
import os

import jax
import optax
from absl import logging
from clu import metric_writers

from mocojax import checkpoint as ckpt_lib
from mocojax import loop as loop_lib
from mocojax import metrics_log as metrics_log_lib
from mocojax import parallel
from mocojax import preemption
from mocojax import stability
from mocojax import step as step_lib
from mocojax import validate
from mocojax import workdir_lock
from mocojax.data import pipeline, sources
from mocojax.evaluation import evaluators as evaluators_lib


def check_config(config):
  """Every bad setting at once, one line each, before any data is read or code compiled."""
  validate.check(config)


def variables_of(state):
  """The base encoder's variables: what the evaluators extract features with."""
  return {'params': state.params, 'batch_stats': state.batch_stats}


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
                                       config.async_checkpointing)
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

  # ---- Data, positioned at the step we resume from (batches are a function of (seed, step)).
  d = config.data
  # The host reads, decodes and crops; the devices finish the views (jitter, blur, ...).
  batches = pipeline.train_batches(
      train_source, sharding=setup.batch_sharding, global_batch=config.batch_size,
      seed=config.seed, start_step=start_step, image_size=d.image_size, recipe=d.recipe,
      crop_scale=tuple(d.crop_scale), mean=d.mean, std=d.std,
      augment_overrides={k: tuple(v) if isinstance(v, (list, tuple)) else v
                         for k, v in d.augment.items() if v is not None})

  stop_at = min(total_steps, config.stop_after_steps or total_steps)

  # ---- Evaluators: kNN on the base backbone's features (and the online probe's accuracy).
  evaluators = []
  knn_every = int(round(config.eval.knn_every_epochs * steps_per_epoch))
  at_end = config.eval.knn_at_end and stop_at == total_steps
  if knn_every or at_end:
    eval_source = sources.get_source(config.data, config.data.eval_split)
    common = dict(features=setup.method.features, variables_of=variables_of, data_config=d,
                  batch_size=config.eval.batch_size, mesh=mesh)
    evaluators.append(loop_lib.Every(evaluators_lib.Knn(
        bank=train_source, queries=eval_source, ks=tuple(config.eval.knn_ks),
        temperature=config.eval.knn_temperature, **common), knn_every, at_end))
    if setup.abstract_state.probe is not None:
      evaluators.append(loop_lib.Every(evaluators_lib.OnlineProbe(queries=eval_source, **common),
                                       knn_every, at_end))

  # ---- Metrics: rows and events a killed run logged after its last checkpoint are dropped,
  # so each step appears once.
  writer = loop_lib.MetricsWriter(workdir, resume_step=start_step)
  layer_groups = setup.layer_groups

  # The instability alarm reads the rows as they are written; a resumed run first replays the
  # rows it keeps (their alarms were raised before).
  alarm = None
  if primary:
    alarm = stability.Alarm.from_config(config.stability, layer_groups)
    alarm.replay(metrics_log_lib.read_rows(writer.jsonl.path))

  def raise_alarms(step, events):
    for e in events:
      logging.warning('Instability: %s', e.message)
      writer.write(step, e.scalars(layer_groups))

  guard = loop_lib.Guard(config.divergence.max_update_ratio,
                         config.divergence.max_param_norm_growth, start_param_norm)
  loop = loop_lib.Loop(
      writer=writer, steps_per_epoch=steps_per_epoch, examples_per_step=config.batch_size,
      log_every=config.log_every_steps, checkpointer=checkpointer,
      checkpoint_every=config.checkpoint_every_steps, seed=config.seed,
      save_extra=dict(run=dict(start_param_norm=start_param_norm)), watcher=watcher,
      check=functools.partial(
          loop_lib.check_step, groups=layer_groups, guard=guard,
          checkpoint_dir=checkpointer.directory,
          advice='Lower optimizer.base_lr, raise warmup_epochs, or loosen config.divergence'),
      checked=('loss', 'param_norm', 'update_norm', 'grad_inf'),
      vectors={'grad_inf': layer_groups},
      total_steps=total_steps,
      on_row=(lambda step, scalars: raise_alarms(step, alarm.observe(step, scalars)))
      if alarm else None)

  try:
    with metric_writers.ensure_flushes(writer.tensorboard):
      state, summary = loop.run(state, setup.step, batches, start_step=start_step,
                                stop_at=stop_at, evaluators=evaluators,
                                evaluations_pending=loop_lib.evaluations_pending(meta))
      if stop_at == total_steps and alarm is not None:
        raise_alarms(stop_at, alarm.finish())  # a spike still being followed
  except BaseException:
    # Wait for a save in flight, but never let its error hide the one that stopped the run.
    try:
      checkpointer.close()
    except Exception as e:  # pylint: disable=broad-except
      logging.error('Closing the checkpointer also failed: %s', e)
    raise
  finally:
    # Nothing of this run outlives it: a later run in the same process (a resume, a sweep, a
    # notebook) rewrites the event files, and a writer left open would still hold them.
    writer.close()
    batches.close()
  checkpointer.close()
  if primary and config.plot:
    from mocojax import report  # matplotlib only when plotting
    report.write_plots(workdir)
  return summary
