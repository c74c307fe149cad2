"""Linear probe: a Linear classifier trained on the frozen pretrained backbone.

The protocol of the MoCo papers: backbone in inference mode (BN on running statistics) and
never updated; one Linear layer initialised N(0, 0.01) with zero bias; SGD, momentum 0.9, no
weight decay; lr = base_lr * batch / 256 with the recipe's base_lr; RandomResizedCrop + flip for
training, resize + centre crop for evaluation; top-1 on the eval split.

  recipe                         base_lr  epochs  schedule
  MoCo v3, ViT                   3        90      cosine
  MoCo v3, ResNet                0.1      90      cosine
  MoCo v1/v2 (ResNet)            30       100     x0.1 at 60% and 80% of the run (epochs 60, 80)

Two modes:
  * augmented (default): every step runs the backbone on freshly augmented crops;
  * fast (`fast=True`): the backbone runs once over both splits without augmentation
    (centre crop), the features are cached on device, and the heads train on them. Meant for
    small datasets (Fashion-MNIST); it gives up the crop augmentation.
In both, `lr_multipliers` trains one head per multiplier of the base lr side by side on the same
features (one backbone pass for all), and the best head's top-1 is reported. That choice is made
on the eval split, as DINO's and MAE's sweeps do; say so when quoting the number.
`feature_norm=True` puts a parameter-free BatchNorm in front of each head, as MAE does.

The augmented mode checkpoints the heads (orbax, atomic, with the data position and the
run-defining settings) to <outdir>/checkpoints every `checkpoint_every_steps`; rerunning the
command resumes the same probe. The fast mode has nothing worth saving: its cost is the one
feature pass, and its epochs take seconds.
"""

import dataclasses
import json
import os
import time
from typing import Any, Optional

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from clu import metric_writers
from jax.sharding import Mesh

from mocojax import checkpoint as ckpt_lib
from mocojax import methods, models, parallel
from mocojax.data import pipeline, sources
from mocojax.data.sources import Source
from mocojax.evaluation import classification
from mocojax.evaluation import features as features_lib
from mocojax.hand_off import pretraining_run


@flax.struct.dataclass
class HeadState:
  step: jax.Array
  params: Any            # every leaf has a leading head axis [K, ...]
  batch_stats: Any       # the feature BN's running statistics ({} without feature_norm)
  opt_state: Any


# ----------------------------------------------------------------------------------------------
# Settings: the probe config with the recipe filled in.
# ----------------------------------------------------------------------------------------------
def recipe(pretrain_config) -> dict:
  """base_lr, epochs and schedule of the reference linear probe for this pretraining run."""
  own = getattr(methods.method_class(pretrain_config), 'probe_recipe', None)
  return dict(own or models.backbone(pretrain_config.model).probe_recipe)


def resolve(probe_config, pretrain_config) -> ml_collections.ConfigDict:
  """The probe config with every None taken from the recipe or the pretraining config."""
  c = ml_collections.ConfigDict(probe_config.to_dict())
  for k, v in recipe(pretrain_config).items():
    if c.get(k) is None:
      c[k] = v
  if c.schedule not in ('cosine', 'steps'):
    raise ValueError(f"schedule={c.schedule!r}: use 'cosine' or 'steps'.")
  if not c.lr_multipliers:
    raise ValueError('lr_multipliers is empty: give at least one (1.0 is the recipe lr).')
  if c.get('eval_batch_size') is None:
    c.eval_batch_size = pretrain_config.eval.batch_size
  parallel.check_batch_size(c.batch_size, 'batch_size')
  parallel.check_batch_size(c.eval_batch_size, 'eval_batch_size')
  return c


def peak_learning_rates(settings) -> np.ndarray:
  return np.asarray([settings.base_lr * m * settings.batch_size / 256
                     for m in settings.lr_multipliers], np.float64)


def lr_factor_schedule(settings, steps_per_epoch: int):
  """Step -> multiplier of the peak lr (1 at step 0)."""
  total = max(1, int(round(settings.epochs * steps_per_epoch)))
  if settings.schedule == 'steps':
    return optax.piecewise_constant_schedule(
        1.0, {int(round(f * total)): 0.1 for f in settings.decay_at})
  return optax.cosine_decay_schedule(1.0, total)


# ----------------------------------------------------------------------------------------------
# The step, shared by both modes.
# ----------------------------------------------------------------------------------------------
def init_heads(settings, num_classes: int, feature_dim: int, seed: int):
  heads = classification.LinearHeads(num_classes, len(settings.lr_multipliers),
                                     settings.feature_norm)
  # PyTorch SGD with momentum: d = g + wd * p; buf = mu * buf + d; p -= lr * buf. The per-head
  # lr is applied in the step, after this (linear) chain.
  tx = optax.chain(optax.add_decayed_weights(settings.weight_decay),
                   optax.trace(decay=settings.momentum, nesterov=False))

  def init():
    v = heads.init(jax.random.key(seed), jnp.zeros((1, feature_dim)), train=False)
    return HeadState(step=jnp.zeros((), jnp.int32), params=v['params'],
                     batch_stats=v.get('batch_stats', {}), opt_state=tx.init(v['params']))

  return heads, tx, init


def head_step(state: HeadState, features, labels, *, heads, tx, lr_factor, peak_lrs):
  """One SGD step of every head on the same features [B, D]; returns (state, losses [K])."""
  features = jax.lax.stop_gradient(features)

  def loss_fn(params):
    logits, updates = heads.apply({'params': params, 'batch_stats': state.batch_stats},
                                  features, train=True, mutable=['batch_stats'])
    losses = classification.cross_entropy(logits, labels)
    # Heads share no parameter, so the gradient of the sum is each head's own gradient.
    return losses.sum(), (losses, updates.get('batch_stats', {}))

  (_, (losses, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  direction, opt_state = tx.update(grads, state.opt_state, state.params)
  lrs = jnp.asarray(peak_lrs, jnp.float32) * lr_factor(state.step)
  updates = jax.tree.map(lambda d: -d * lrs.reshape((-1,) + (1,) * (d.ndim - 1)), direction)
  return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                       batch_stats=batch_stats, opt_state=opt_state), losses


def head_logits(heads, state: HeadState, features):
  return heads.apply({'params': state.params, 'batch_stats': state.batch_stats}, features,
                     train=False)


# ----------------------------------------------------------------------------------------------
# Fast mode: cached features.
# ----------------------------------------------------------------------------------------------
def cache_features(backbone, source: Source, settings, data_config, mesh: Mesh):
  """(features, labels, mask) of every example, centre-cropped, row-sharded and padded."""
  return features_lib.split_features(backbone.features, backbone.variables, source,
                                     data_config=data_config,
                                     batch_size=settings.eval_batch_size, mesh=mesh)


def _check_padding_at_end(mask, n: int):
  # eval_dataset puts example i at global row i and padding after the last example; the fast
  # mode indexes rows 0..n-1 directly, so make sure of it.
  valid = int(jax.device_get(jax.jit(lambda m: jnp.sum(m[:n]) + jnp.sum(~m[n:]))(mask)))
  if valid != mask.shape[0]:
    raise AssertionError('cached features are not in example order with padding at the end.')


def _fast_epochs(settings, heads, tx, lr_factor, peak_lrs, mesh):
  """jit(state, features, labels, rows [steps, B]) -> (state, losses [steps, K])."""
  data = parallel.batch_sharding(mesh)

  def epoch(state, features, labels, rows):
    def body(state, idx):
      # Features are replicated, so the gather is local; the batch is then split over devices.
      f = jax.lax.with_sharding_constraint(jnp.take(features, idx, axis=0), data)
      y = jax.lax.with_sharding_constraint(jnp.take(labels, idx, axis=0), data)
      return head_step(state, f, y, heads=heads, tx=tx, lr_factor=lr_factor, peak_lrs=peak_lrs)

    return jax.lax.scan(body, state, rows)

  return jax.jit(epoch, donate_argnums=0)


def _count_cached(heads, state, features, labels, mask, chunk: int) -> np.ndarray:
  count = jax.jit(lambda s, f, y, m: classification.count_correct(head_logits(heads, s, f), y, m))
  total = 0
  for start in range(0, features.shape[0], chunk):
    sl = slice(start, start + chunk)
    total = total + count(state, features[sl], labels[sl], mask[sl])
  return np.asarray(jax.device_get(total))


# ----------------------------------------------------------------------------------------------
# The probe.
# ----------------------------------------------------------------------------------------------
def _data_config(pretrain_config, settings):
  d = ml_collections.ConfigDict(pretrain_config.data.to_dict())
  for field in ('data_dir', 'train_split', 'eval_split'):
    if settings.get(field) is not None:
      d[field] = settings[field]
  return d


@dataclasses.dataclass
class RawPixels:
  """The probe's baseline: the normalised pixels of the same centre crops as features."""
  config: Any
  step: int
  variables: dict = dataclasses.field(default_factory=dict)

  def features(self, variables, images):
    del variables
    return images.reshape(images.shape[0], -1)


def run(workdir: str, probe_config, *, outdir: Optional[str] = None,
        train_source: Optional[Source] = None, eval_source: Optional[Source] = None,
        mesh: Optional[Mesh] = None):
  """Probes the run in `workdir`; writes metrics and result.json to `outdir` (default
  `<workdir>/linear_probe`). Returns (result, trained) where result holds top1 (best head),
  best_lr, top1_by_lr and what was probed, and trained = {'heads': HeadState, 'backbone':
  PretrainedBackbone} (the backbone exactly as restored: nothing here writes to it).

  `train_source`/`eval_source` replace the splits the pretraining data config names (tests,
  other datasets).
  """
  mesh = mesh or parallel.make_mesh()
  backbone = pretraining_run.restore_backbone(workdir, probe_config.get('step'), mesh=mesh)
  if probe_config.get('raw_pixels', False):
    backbone = RawPixels(backbone.config, backbone.step)
  pre = backbone.config
  settings = resolve(probe_config, pre)
  d = _data_config(pre, settings)
  train_source = train_source or sources.get_source(d, d.train_split)
  eval_source = eval_source or sources.get_source(d, d.eval_split)
  num_classes = train_source.num_classes
  outdir = outdir or os.path.join(workdir, 'linear_probe')
  primary = jax.process_index() == 0
  if primary:
    os.makedirs(outdir, exist_ok=True)
  writer = metric_writers.create_default_writer(outdir, just_logging=not primary)

  spe = pipeline.steps_per_epoch(train_source, settings.batch_size)
  total_steps = max(1, int(round(settings.epochs * spe)))
  eval_every = int(round(settings.eval_every_epochs * spe)) if settings.eval_every_epochs else 0
  lr_factor = lr_factor_schedule(settings, spe)
  peak_lrs = peak_learning_rates(settings)
  feature_dim = jax.eval_shape(
      backbone.features, backbone.variables,
      jax.ShapeDtypeStruct((1, d.image_size, d.image_size, train_source.image_shape[-1]),
                           jnp.float32)).shape[-1]
  heads, tx, init = init_heads(settings, num_classes, feature_dim, settings.seed)
  replicated = parallel.replicated(mesh)
  data_sharding = parallel.batch_sharding(mesh)
  state = jax.jit(init, out_shardings=replicated)()
  logging.info('Linear probe of %s (step %d): %s mode, %d heads (lr %s), %d steps (%d/epoch), '
               'features %d, classes %d.', workdir, backbone.step,
               'fast' if settings.fast else 'augmented', len(peak_lrs),
               ', '.join(f'{x:g}' for x in peak_lrs), total_steps, spe, feature_dim, num_classes)

  start_step, checkpointer = 0, None
  if not settings.fast:
    checkpointer = ckpt_lib.Checkpointer(outdir, settings, settings.checkpoint_every_steps,
                                         settings.keep_checkpoints)
    resumed, meta = checkpointer.resume(jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated), state))
    if resumed is not None:
      state, start_step = resumed, meta['step']
      logging.info('Resumed the linear probe from %s at step %d.', checkpointer.directory,
                   start_step)

  metrics_log = os.path.join(outdir, 'metrics.jsonl')
  if primary:
    if start_step == 0:
      open(metrics_log, 'w').close()   # a fresh probe starts its log; a resumed one appends
    with open(os.path.join(outdir, 'config.json'), 'w') as f:
      f.write(settings.to_json_best_effort(indent=2))

  def write(step, scalars):
    writer.write_scalars(step, scalars)
    if primary:
      with open(metrics_log, 'a') as f:
        f.write(json.dumps({'step': step, **{k: float(v) for k, v in scalars.items()}}) + '\n')

  def accuracies(correct, n):
    return {f'top1/lr={lr:g}': float(c) / n for lr, c in zip(peak_lrs, correct)}

  t0 = time.time()
  if settings.fast:
    train_f, train_y, train_m = cache_features(backbone, train_source, settings, d, mesh)
    eval_f, eval_y, eval_m = cache_features(backbone, eval_source, settings, d, mesh)
    _check_padding_at_end(train_m, train_source.num_examples)
    logging.info('Cached features of %d + %d images in %.1fs.', train_source.num_examples,
                 eval_source.num_examples, time.time() - t0)
    # Replicated so every step's gather is local (fast mode is for data sets whose features
    # fit on each device).
    train_f, train_y = jax.jit(lambda *a: a, out_shardings=replicated)(train_f, train_y)
    epoch_fn = _fast_epochs(settings, heads, tx, lr_factor, peak_lrs, mesh)

    def evaluate(state):
      return _count_cached(heads, state, eval_f, eval_y, eval_m, settings.eval_batch_size)

    step = 0
    for epoch in range(int(np.ceil(total_steps / spe))):
      steps = min(spe, total_steps - step)
      order = np.random.default_rng([settings.seed, epoch]).permutation(
          train_source.num_examples)
      rows = jax.device_put(order[:steps * settings.batch_size].reshape(
          steps, settings.batch_size).astype(np.int32), replicated)
      state, losses = epoch_fn(state, train_f, train_y, rows)
      step += steps
      losses = np.asarray(jax.device_get(losses)).mean(axis=0)
      scalars = {f'loss/lr={lr:g}': l for lr, l in zip(peak_lrs, losses)}
      scalars.update(epoch=step / spe, lr_factor=float(lr_factor(step - 1)))
      if (eval_every and step % eval_every == 0) and step < total_steps:
        scalars.update(accuracies(evaluate(state), eval_source.num_examples))
      write(step, scalars)
  else:
    step_fn = jax.jit(
        lambda s, v, b: head_step(s, backbone.features(v, b['image']), b['label'], heads=heads,
                                  tx=tx, lr_factor=lr_factor, peak_lrs=peak_lrs),
        in_shardings=(replicated, replicated, data_sharding),
        out_shardings=(replicated, replicated), donate_argnums=0)
    count = jax.jit(lambda s, v, b: classification.count_correct(
        head_logits(heads, s, backbone.features(v, b['image'])), b['label'], b['mask']),
        in_shardings=(replicated, replicated, data_sharding), out_shardings=replicated)

    def evaluate(state):
      total = 0
      for batch in pipeline.eval_batches(eval_source, sharding=data_sharding,
                                         global_batch=settings.eval_batch_size,
                                         image_size=d.image_size, mean=d.mean, std=d.std):
        total = total + count(state, backbone.variables, batch)
      return np.asarray(jax.device_get(total))

    batches = classification.train_batches(
        train_source, sharding=data_sharding, global_batch=settings.batch_size,
        seed=settings.seed, start_step=start_step, image_size=d.image_size, mean=d.mean,
        std=d.std, crop_scale=settings.crop_scale)
    pending = []
    stop_at = min(total_steps, settings.get('stop_after_steps') or total_steps)
    for step in range(start_step + 1, stop_at + 1):
      state, losses = step_fn(state, backbone.variables, next(batches))
      pending.append(losses)
      if step % settings.log_every_steps == 0 or step == total_steps:
        losses = np.mean(jax.device_get(pending), axis=0)
        pending = []
        scalars = {f'loss/lr={lr:g}': l for lr, l in zip(peak_lrs, losses)}
        scalars.update(epoch=step / spe, lr_factor=float(lr_factor(step - 1)))
        if not np.all(np.isfinite(losses)):
          logging.warning('Non-finite loss at step %d for lr %s.', step,
                          [f'{lr:g}' for lr, l in zip(peak_lrs, losses) if not np.isfinite(l)])
        write(step, scalars)
      if step % settings.checkpoint_every_steps == 0 or step == stop_at:
        checkpointer.save(step, state, dict(seed=settings.seed, next_step=step), force=True)
      if eval_every and step % eval_every == 0 and step < total_steps:
        write(step, accuracies(evaluate(state), eval_source.num_examples))
    checkpointer.close()

  final = accuracies(evaluate(state), eval_source.num_examples)
  best = int(np.argmax([final[f'top1/lr={lr:g}'] for lr in peak_lrs]))
  result = dict(
      top1=final[f'top1/lr={peak_lrs[best]:g}'], best_lr=float(f'{peak_lrs[best]:.6g}'),
      best_base_lr=float(f'{settings.base_lr * settings.lr_multipliers[best]:.6g}'),
      top1_by_lr={f'{lr:g}': final[f'top1/lr={lr:g}'] for lr in peak_lrs},
      mode='fast' if settings.fast else 'augmented', epochs=float(settings.epochs),
      steps=int(total_steps), batch_size=int(settings.batch_size),
      feature_norm=bool(settings.feature_norm), pretraining_workdir=os.path.abspath(workdir),
      pretraining_step=backbone.step, eval_examples=int(eval_source.num_examples),
      resumed_from=start_step,
      seconds=round(time.time() - t0, 1))
  write(total_steps, {**final, 'top1': result['top1']})
  writer.flush()
  if primary:
    with open(os.path.join(outdir, 'result.json'), 'w') as f:
      json.dump(result, f, indent=2)
  logging.info('Linear probe: top-1 %.4f (best of %d heads, lr %g).', result['top1'],
               len(peak_lrs), result['best_lr'])
  return result, dict(heads=state, backbone=backbone)
