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
import functools
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
from jax.sharding import Mesh

from mocojax import checkpoint as ckpt_lib
from mocojax import loop as loop_lib
from mocojax import methods, models, parallel, preemption
from mocojax.data import labelled, pipeline, sources
from mocojax.data.sources import Source
from mocojax.downstream import classification
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
    if c[k] is None:
      c[k] = v
  if c.schedule not in ('cosine', 'steps'):
    raise ValueError(f"schedule={c.schedule!r}: use 'cosine' or 'steps'.")
  if not c.lr_multipliers:
    raise ValueError('lr_multipliers is empty: give at least one (1.0 is the recipe lr).')
  if c.eval_batch_size is None:
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


def head_names(peak_lrs) -> tuple:
  """The heads' names in logged metrics ('loss/lr=0.75'): their peak learning rates."""
  return tuple(f'lr={lr:g}' for lr in peak_lrs)


def head_step(state: HeadState, features, labels, *, heads, tx, lr_factor, peak_lrs):
  """One SGD step of every head on the same features [B, D]; returns (state, metrics) with
  the loss [K] and the gradient's infinity-norm [K] of each head, and the lr factor."""
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
  num_heads = len(peak_lrs)
  grad_inf = jnp.max(jnp.stack([jnp.max(jnp.abs(g.reshape(num_heads, -1)), axis=1)
                                for g in jax.tree.leaves(grads)]), axis=0)
  metrics = dict(loss=losses, grad_inf=grad_inf, lr_factor=lr_factor(state.step))
  return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                       batch_stats=batch_stats, opt_state=opt_state), metrics


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
  """jit(state, features, labels, rows [steps, B]) -> (state, metrics of every step [steps, ...])."""
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
    if settings[field] is not None:
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


@dataclasses.dataclass
class HeadsTop1:
  """Evaluator: top-1 of every head on the eval split (resize + centre crop), features from
  the frozen backbone."""
  heads: Any
  backbone: Any
  source: Source
  sharding: Any
  data_config: Any
  batch_size: int
  names: tuple

  def __post_init__(self):
    self._count = jax.jit(lambda s, v, b: classification.count_correct(
        head_logits(self.heads, s, self.backbone.features(v, b['image'])), b['label'],
        b['mask']))

  def run(self, state) -> dict:
    d, total = self.data_config, 0
    for batch in pipeline.eval_batches(self.source, sharding=self.sharding,
                                       global_batch=self.batch_size, image_size=d.image_size,
                                       mean=d.mean, std=d.std):
      total = total + self._count(state, self.backbone.variables, batch)
    return _accuracies(self.names, jax.device_get(total), self.source.num_examples)


def _accuracies(names, correct, n) -> dict:
  return {f'top1/{name}': float(c) / n for name, c in zip(names, correct)}


def run(workdir: str, probe_config, *, outdir: Optional[str] = None,
        train_source: Optional[Source] = None, eval_source: Optional[Source] = None,
        mesh: Optional[Mesh] = None):
  """Probes the run in `workdir`; writes metrics and result.json to `outdir` (default
  `<workdir>/linear_probe`). Returns (result, trained) where result holds top1 (best head),
  best_lr, top1_by_lr and what was probed, and trained = {'heads': HeadState, 'backbone':
  PretrainedBackbone} (the backbone exactly as restored: nothing here writes to it).

  `train_source`/`eval_source` replace the splits the pretraining data config names (tests,
  other datasets). A step at which any head is not finite raises loop.DivergenceError (naming
  the step and the head); SIGTERM/SIGINT save the augmented probe and raise
  preemption.Preempted.
  """
  with preemption.Watcher() as watcher:
    return _probe(workdir, probe_config, outdir, train_source, eval_source, mesh, watcher)


def _probe(workdir, probe_config, outdir, train_source, eval_source, mesh, watcher):
  mesh = mesh or parallel.make_mesh()
  backbone = pretraining_run.restore_backbone(workdir, probe_config.step, mesh=mesh)
  if probe_config.raw_pixels:
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

  spe = pipeline.steps_per_epoch(train_source, settings.batch_size)
  total_steps = max(1, int(round(settings.epochs * spe)))
  eval_every = int(round(settings.eval_every_epochs * spe)) if settings.eval_every_epochs else 0
  lr_factor = lr_factor_schedule(settings, spe)
  peak_lrs = peak_learning_rates(settings)
  names = head_names(peak_lrs)
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

  start_step, checkpointer, meta = 0, None, None
  if not settings.fast:
    checkpointer = ckpt_lib.Checkpointer(outdir, settings, settings.checkpoint_every_steps,
                                         settings.keep_checkpoints)
    resumed, meta = checkpointer.resume(jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated), state))
    if resumed is not None:
      state, start_step = resumed, meta['step']
      logging.info('Resumed the linear probe from %s at step %d.', checkpointer.directory,
                   start_step)
  if primary:
    with open(os.path.join(outdir, 'config.json'), 'w') as f:
      f.write(settings.to_json_best_effort(indent=2))
  writer = loop_lib.MetricsWriter(outdir, resume_step=start_step)
  check = functools.partial(
      loop_lib.check_step, groups=names,
      checkpoint_dir=checkpointer.directory if checkpointer else '',
      advice='Lower base_lr, or drop the lr_multipliers of the heads named')

  t0 = time.time()
  if settings.fast:
    state, final = _fast(settings, backbone, heads, tx, lr_factor, peak_lrs, names, state, d,
                         train_source, eval_source, mesh, writer, check, spe, total_steps,
                         eval_every)
  else:
    step_fn = jax.jit(
        lambda s, v, b: head_step(s, backbone.features(v, b['image']), b['label'], heads=heads,
                                  tx=tx, lr_factor=lr_factor, peak_lrs=peak_lrs),
        in_shardings=(replicated, replicated, data_sharding),
        out_shardings=(replicated, replicated), donate_argnums=0)
    top1 = HeadsTop1(heads, backbone, eval_source, data_sharding, d, settings.eval_batch_size,
                     names)
    batches = labelled.train_batches(
        train_source, sharding=data_sharding, global_batch=settings.batch_size,
        seed=settings.seed, start_step=start_step, image_size=d.image_size, mean=d.mean,
        std=d.std, crop_scale=settings.crop_scale)
    stop_at = min(total_steps, settings.stop_after_steps or total_steps)
    loop = loop_lib.Loop(
        writer=writer, steps_per_epoch=spe, examples_per_step=settings.batch_size,
        log_every=settings.log_every_steps, checkpointer=checkpointer,
        checkpoint_every=settings.checkpoint_every_steps, seed=settings.seed, watcher=watcher,
        check=check, checked=('loss', 'grad_inf'), vectors={'loss': names, 'grad_inf': names},
        total_steps=total_steps)
    try:
      state, summary = loop.run(state, lambda s, b: step_fn(s, backbone.variables, b), batches,
                                start_step=start_step, stop_at=stop_at,
                                evaluators=[loop_lib.Every(top1, eval_every, at_end=True)],
                                evaluations_pending=loop_lib.evaluations_pending(meta))
    finally:
      checkpointer.close()
      batches.close()
    final = {k: v for k, v in summary.items() if k.startswith('top1/')}
    if len(final) < len(names):  # rerun after the end: nothing left to train
      final = top1.run(state)

  best = int(np.argmax([final[f'top1/{name}'] for name in names]))
  result = dict(
      top1=final[f'top1/{names[best]}'], best_lr=float(f'{peak_lrs[best]:.6g}'),
      best_base_lr=float(f'{settings.base_lr * settings.lr_multipliers[best]:.6g}'),
      top1_by_lr={f'{lr:g}': final[f'top1/{name}'] for lr, name in zip(peak_lrs, names)},
      mode='fast' if settings.fast else 'augmented', epochs=float(settings.epochs),
      steps=int(total_steps), batch_size=int(settings.batch_size),
      feature_norm=bool(settings.feature_norm), pretraining_workdir=os.path.abspath(workdir),
      pretraining_step=backbone.step, eval_examples=int(eval_source.num_examples),
      resumed_from=start_step,
      seconds=round(time.time() - t0, 1))
  writer.write(total_steps, {'top1': result['top1']})
  writer.close()   # nothing outlives the run (see train.py)
  if primary:
    with open(os.path.join(outdir, 'result.json'), 'w') as f:
      json.dump(result, f, indent=2)
  logging.info('Linear probe: top-1 %.4f (best of %d heads, lr %g).', result['top1'],
               len(peak_lrs), result['best_lr'])
  return result, dict(heads=state, backbone=backbone)


def _fast(settings, backbone, heads, tx, lr_factor, peak_lrs, names, state, d, train_source,
          eval_source, mesh, writer, check, spe, total_steps, eval_every):
  """The fast mode: features cached once, then whole epochs of head steps in one scan each.
  Returns (state, top-1 per head)."""
  t0 = time.time()
  replicated = parallel.replicated(mesh)
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
    correct = _count_cached(heads, state, eval_f, eval_y, eval_m, settings.eval_batch_size)
    return _accuracies(names, correct, eval_source.num_examples)

  step = 0
  for epoch in range(int(np.ceil(total_steps / spe))):
    steps = min(spe, total_steps - step)
    order = np.random.default_rng([settings.seed, epoch]).permutation(
        train_source.num_examples)
    rows = jax.device_put(order[:steps * settings.batch_size].reshape(
        steps, settings.batch_size).astype(np.int32), replicated)
    state, metrics = epoch_fn(state, train_f, train_y, rows)
    metrics = jax.device_get(metrics)
    # The loop's finite check, on each step of the epoch: the first bad step is named.
    for i in range(steps):
      check({k: metrics[k][i] for k in ('loss', 'grad_inf')}, step + i + 1)
    step += steps
    scalars = {f'loss/{name}': l for name, l in zip(names, metrics['loss'].mean(axis=0))}
    scalars.update(epoch=step / spe, lr_factor=float(lr_factor(step - 1)))
    if (eval_every and step % eval_every == 0) and step < total_steps:
      scalars.update(evaluate(state))
    writer.write(step, scalars)
  final = evaluate(state)
  writer.write(step, final)
  return state, final
