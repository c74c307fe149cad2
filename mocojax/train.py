"""The MoCo trainer: read it top to bottom.

  mesh -> input -> model, optimizer, schedules -> state (created sharded) -> checkpoint restore
  -> the jitted pure step -> evaluators -> the loop (metrics, progress, NaN stop, saves, kNN).

The train state holds everything a step changes; the step is a pure function
(state, batch) -> (state, metrics), jitted with the batch split over every mesh axis, the state
laid out by `parallel.state_shardings` (replicated on the default data-parallel mesh; large
parameters and their optimizer state split over 'fsdp' when the mesh has that axis), and the
state's buffers donated.
"""

import functools
import json
import os
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from clu import metric_writers, periodic_actions

from mocojax import checkpoint as ckpt_lib
from mocojax import methods
from mocojax import momentum as momentum_lib
from mocojax import optim
from mocojax import parallel
from mocojax import models
from mocojax.data import pipeline, sources
from mocojax.evaluation import features as features_lib
from mocojax.evaluation import knn as knn_lib
from mocojax.evaluation import online_probe


@flax.struct.dataclass
class TrainState:
  step: jax.Array                 # number of optimizer steps taken
  params: Any                     # base encoder (backbone, projector, predictor)
  batch_stats: Any                # its BN running statistics
  momentum_params: Any            # EMA of params['backbone'|'projector']; never optimised
  momentum_batch_stats: Any
  opt_state: Any
  method_state: Any               # e.g. the v1/v2 queue; empty for v3
  rng: jax.Array                  # folded with the step for per-step randomness
  probe: Any = None               # online linear probe {'params', 'opt_state'}, or None


class NonFiniteLossError(FloatingPointError):
  pass


# ----------------------------------------------------------------------------------------------
# The step.
# ----------------------------------------------------------------------------------------------
def _max_abs_under(tree, prefix: str):
  leaves = [jnp.max(jnp.abs(x)) for path, x in jax.tree_util.tree_leaves_with_path(tree)
            if optim._path_name(path).startswith(prefix)]
  return jnp.max(jnp.stack(leaves)) if leaves else jnp.float32(jnp.nan)


def train_step(state: TrainState, batch, *, method, tx, lr_schedule, momentum_schedule,
               grad_probes: dict, probe_tx=None):
  """One MoCo step. Pure: (state, batch) -> (state, metrics)."""
  # The reference updates the key encoder at the start of each forward pass, so the keys of
  # step t come from the encoder averaged with the base parameters of step t-1.
  m = momentum_schedule(state.step)
  momentum_params = momentum_lib.ema_update(state.momentum_params, state.params, m)
  rng = jax.random.fold_in(state.rng, state.step)

  def loss_fn(params):
    return method.loss(params, state, momentum_params, batch, rng)

  (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)

  metrics = dict(loss=loss, lr=lr_schedule(state.step), momentum=m,
                 grad_norm=optax.tree.norm(grads), param_norm=optax.tree.norm(params),
                 update_norm=optax.tree.norm(updates), **aux['metrics'])
  # The v3 paper's Fig. 5 signals: the infinity-norm of first-layer and last-block gradients.
  for name, prefix in grad_probes.items():
    metrics[f'grad_max/{name}'] = _max_abs_under(grads, prefix)
  probe = state.probe
  if probe is not None:
    probe, probe_metrics = online_probe.update(probe, aux['features'], batch['label'], probe_tx)
    metrics.update(probe_metrics)
  new_state = state.replace(probe=probe, 
      step=state.step + 1, params=params, batch_stats=aux['batch_stats'],
      momentum_params=momentum_params, momentum_batch_stats=aux['momentum_batch_stats'],
      opt_state=opt_state, method_state=aux['method_state'])
  return new_state, metrics


def init_state(rng, sample_images, *, method, tx, probe_tx=None, num_classes=0) -> TrainState:
  init_rng, state_rng = jax.random.split(rng)
  v = method.init(init_rng, sample_images)
  probe = None
  if probe_tx is not None:
    feature_dim = method.features(v, sample_images).shape[-1]
    probe = online_probe.init(feature_dim, num_classes, probe_tx)
  return TrainState(step=jnp.zeros((), jnp.int32), params=v['params'],
                    batch_stats=v['batch_stats'], momentum_params=v['momentum_params'],
                    momentum_batch_stats=v['momentum_batch_stats'],
                    opt_state=tx.init(v['params']), method_state=v['method_state'],
                    rng=state_rng, probe=probe)


def input_shape(config, source) -> tuple:
  return (config.data.image_size, config.data.image_size, source.image_shape[-1])


def build(config, steps_per_epoch: int, channels: int, num_classes: int = 0):
  """Method, optimizer and schedules of a config; shared by the trainer, tests and benches.

  With num_classes > 0 and config.online_probe.enabled, the state carries an online probe.
  """
  dtype = jnp.dtype(config.get('dtype', 'float32'))
  method = methods.build_method(config, dtype)
  warmup, total = optim.schedule_steps(config, steps_per_epoch)
  del warmup
  sample = jnp.zeros((1, config.data.image_size, config.data.image_size, channels))
  abstract_params = jax.eval_shape(lambda: method.init(jax.random.key(0), sample))['params']
  tx, lr = optim.build_optimizer(config, abstract_params, steps_per_epoch)
  m = momentum_lib.momentum_schedule(config.momentum.base, total, config.momentum.cosine)
  probe_tx = None
  if num_classes and config.get('online_probe') and config.online_probe.enabled:
    probe_tx = online_probe.optimizer(config.online_probe)
  step_fn = functools.partial(train_step, method=method, tx=tx, lr_schedule=lr,
                              momentum_schedule=m, grad_probes=models.grad_probes(config.model),
                              probe_tx=probe_tx)
  init_fn = functools.partial(init_state, method=method, tx=tx, probe_tx=probe_tx,
                              num_classes=num_classes)
  return method, step_fn, init_fn, total


def check_config(config):
  """Cheap checks that fail with a clear message before any data is read or code compiled."""
  parallel.check_batch_size(config.batch_size)
  if config.method not in methods.METHODS:
    raise ValueError(f'config.method={config.method!r} is unknown; use one of {methods.METHODS}.')
  if config.model.name not in models.BACKBONES:
    raise ValueError(f'model.name={config.model.name!r} is not a known backbone; '
                     f'use one of {models.BACKBONES}.')
  if config.optimizer.name not in optim.OPTIMIZERS:
    raise ValueError(f'optimizer.name={config.optimizer.name!r} is unknown; '
                     f'use one of {optim.OPTIMIZERS}.')
  methods.check_config(config)  # e.g. the v1/v2 queue size against the batch


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


def _check_finite(loss, step, checkpointer):
  value = float(jax.device_get(loss))
  if not np.isfinite(value):
    raise NonFiniteLossError(
        f'Loss became {value} at step {step}. Lower optimizer.base_lr or raise warmup_epochs; '
        f'the last good checkpoint is in {checkpointer.directory}.')


# ----------------------------------------------------------------------------------------------
# The loop.
# ----------------------------------------------------------------------------------------------
def train_and_evaluate(config, workdir: str) -> dict:
  """Pretrains per `config`, writing logs and checkpoints to `workdir`; returns final metrics."""
  check_config(config)
  primary = jax.process_index() == 0
  writer = metric_writers.create_default_writer(workdir, just_logging=not primary)
  if primary:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      f.write(config.to_json_best_effort(indent=2))

  # ---- Mesh.
  mesh = parallel.make_mesh(tuple(tuple(a) for a in config.mesh))
  replicated = parallel.replicated(mesh)  # metrics
  data_sharding = parallel.batch_sharding(mesh)

  # ---- Input.
  train_source = sources.get_source(config.data, config.data.train_split)
  steps_per_epoch = pipeline.steps_per_epoch(train_source, config.batch_size)
  channels = train_source.image_shape[-1]

  # ---- Model, optimizer, schedules, and the checkpoint to resume from (config checked first).
  method, step_fn, init_fn, total_steps = build(config, steps_per_epoch, channels,
                                                train_source.num_classes)
  checkpointer = ckpt_lib.Checkpointer(workdir, config, config.checkpoint_every_steps,
                                       config.keep_checkpoints,
                                       config.get('async_checkpointing', True))
  latest = checkpointer.latest_step()
  if latest is not None:
    checkpointer.check_config(latest)

  # ---- State, created already sharded; or restored onto the same shardings.
  sample = jnp.zeros((1,) + input_shape(config, train_source))
  rng = jax.random.key(config.seed)
  abstract = jax.eval_shape(init_fn, rng, sample)
  shardings = parallel.state_shardings(abstract, mesh, config.get('sharding_rules'),
                                       config.get('fsdp_min_size', parallel.FSDP_MIN_SIZE))
  if latest is None:
    state = jax.jit(init_fn, out_shardings=shardings)(rng, sample)
  else:
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            abstract, shardings)
    state, meta = checkpointer.restore(latest, abstract)
    logging.info('Resumed from %s at step %d.', checkpointer.directory, latest)
  start_step = int(jax.device_get(state.step))
  if latest is not None and meta['data']['next_step'] != start_step:
    raise ValueError(f'Checkpoint {latest} in {checkpointer.directory} is inconsistent: the model '
                     f'is at step {start_step} but the data position at {meta["data"]}.')
  num_params = sum(x.size for x in jax.tree.leaves(state.params['backbone']))
  logging.info('Backbone parameters: %.2fM; steps: %d (%d per epoch); global batch %d on %d '
               'devices.', num_params / 1e6, total_steps, steps_per_epoch, config.batch_size,
               jax.device_count())

  # ---- The step.
  train_step_jit = jax.jit(parallel.gather_parameters(step_fn, mesh),
                           in_shardings=(shardings, data_sharding),
                           out_shardings=(shardings, replicated), donate_argnums=0)

  # ---- Evaluators.
  evaluate = None
  knn_every = int(round(config.eval.knn_every_epochs * steps_per_epoch)) if config.eval.knn_every_epochs else 0
  if knn_every or config.eval.get('knn_at_end', True):
    eval_source = sources.get_source(config.data, config.data.eval_split)
    evaluate = knn_evaluator(config, method, mesh, train_source, eval_source)

  # ---- Data, positioned at the step we resume from (batches are a function of (seed, step)).
  d = config.data
  # The host reads, decodes and crops; the devices finish the views (jitter, blur, ...).
  batches = pipeline.train_batches(
      train_source, sharding=data_sharding, global_batch=config.batch_size, seed=config.seed,
      start_step=start_step, image_size=d.image_size, recipe=d.recipe,
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
  metrics_log = os.path.join(workdir, 'metrics.jsonl')
  pending, last, summary = [], None, {}
  t_log, step_log = time.time(), start_step
  input_wait = 0.0  # seconds the loop spent blocked on the input since the last log

  def write(step, scalars):
    writer.write_scalars(step, scalars)
    if primary:
      with open(metrics_log, 'a') as f:
        f.write(json.dumps({'step': step, **{k: float(v) for k, v in scalars.items()}}) + '\n')

  with metric_writers.ensure_flushes(writer):
    for step in range(start_step + 1, stop_at + 1):
      with jax.profiler.StepTraceAnnotation('train', step_num=step):
        t_wait = time.time()
        batch = next(batches)
        input_wait += time.time() - t_wait
        state, metrics = train_step_jit(state, batch)
      pending.append(metrics)
      # Check the previous step's loss: the host stays one step behind the device.
      if last is not None:
        _check_finite(last['loss'], step - 1, checkpointer)
      last = metrics
      for h in hooks:
        h(step)

      if step % config.log_every_steps == 0 or step == stop_at:
        host = jax.device_get(pending)
        scalars = {k: float(np.mean([m[k] for m in host])) for k in host[0]}
        dt = time.time() - t_log
        scalars['images_per_sec'] = (step - step_log) * config.batch_size / max(dt, 1e-9)
        # Share of the wall time the loop waited for input while the device ran the previous
        # step: an upper bound on the time the device sat idle for want of data.
        scalars['input_wait_fraction'] = input_wait / max(dt, 1e-9)
        scalars['epoch'] = step / steps_per_epoch
        write(step, scalars)
        summary.update(scalars)
        pending, t_log, step_log, input_wait = [], time.time(), step, 0.0

      if step == stop_at or step % config.checkpoint_every_steps == 0:
        _check_finite(metrics['loss'], step, checkpointer)  # never save a diverged state
        checkpointer.save(step, state, dict(seed=config.seed, next_step=step), force=True)

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

  checkpointer.close()
  if primary and config.get('plot', True):
    from mocojax import report  # matplotlib only when plotting
    report.write_plots(workdir)
  return summary
