"""End-to-end fine-tuning of an exported encoder with labels.

The exported backbone plus a new Linear head (zero-initialised: the first logits are all equal,
and the backbone's features reach the loss unchanged), trained together with AdamW, linear
warmup then half-cosine, cross-entropy with label smoothing, and optionally layer-wise lr decay
for a ViT (as BEiT/MAE fine-tune): with L blocks, the patch projection, [CLS] and position
table are layer 0, block i is layer i + 1, the final norm and the head layer L + 1, and
layer l's update is scaled by layer_decay ** (L + 1 - l). Biases, norm parameters, [CLS] and
the position table get no weight decay (timm's no_weight_decay set).

Training images are RandomResizedCrop + flip (data/labelled.py); the recipes of
the papers add RandAugment, mixup/cutmix and drop-path, which this module does not have.
Reports top-1 on the eval split (resize + centre crop).

Checkpoints (orbax, atomic, as pretraining's: state plus data position plus the run-defining
config) go to <workdir>/checkpoints every `checkpoint_every_steps`; rerunning the same command
resumes from the latest one and continues the same run, batch for batch.
"""

import dataclasses
import functools
import json
import os
import time
from typing import Any, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from absl import logging
from jax.sharding import Mesh

from mocojax import checkpoint as ckpt_lib
from mocojax import loop as loop_lib
from mocojax import models, optim, parallel, preemption
from mocojax.data import labelled, pipeline, sources
from mocojax.data.sources import Source
from mocojax.downstream import classification
from mocojax.hand_off import encoder as encoder_lib

_NO_DECAY_NAMES = ('cls_token', 'pos_embed')


class Classifier(nn.Module):
  backbone: nn.Module
  num_classes: int

  @nn.compact
  def __call__(self, images, train: bool):
    features = self.backbone(images, train=train)
    return nn.Dense(self.num_classes, kernel_init=nn.initializers.zeros,
                    bias_init=nn.initializers.zeros, name='head')(features.astype(jnp.float32))


@flax.struct.dataclass
class FineTuneState:
  step: jax.Array
  params: Any           # {'backbone': ..., 'head': ...}
  batch_stats: Any      # {'backbone': ...} for BN backbones, else {}
  opt_state: Any


def layer_scales(params, backbone: nn.Module, layer_decay: float):
  """Per-parameter multipliers of the update (all 1 without decay): layer_decay ** (n - layer)
  over the backbone's layers 0..n (its registry entry's `layer_ids`)."""
  if layer_decay == 1.0:
    return jax.tree.map(lambda _: 1.0, params)
  entry = models.of_module(backbone)
  if entry is None or entry.layer_ids is None:
    raise ValueError(f'layer_decay={layer_decay} is not defined for {type(backbone).__name__} '
                     f'backbones; set layer_decay=1.0.')
  layer_id, n = entry.layer_ids(backbone)
  return jax.tree_util.tree_map_with_path(
      lambda path, _: float(layer_decay**(n - layer_id(parallel.path_name(path)))), params)


def weight_decay_mask(params):
  return jax.tree_util.tree_map_with_path(
      lambda path, p: p.ndim > 1 and parallel.path_name(path).split('/')[-1] not in _NO_DECAY_NAMES,
      params)


def learning_rate_schedule(config, steps_per_epoch: int):
  """(schedule, total steps): pretraining's warmup + cosine, ending at config.min_lr."""
  warmup, total = optim.schedule_steps(config, steps_per_epoch)
  peak = config.base_lr * config.batch_size / 256
  return optim.warmup_cosine(peak, warmup, total, config.min_lr), total


def build_optimizer(config, params, backbone: nn.Module, lr):
  scales = layer_scales(params, backbone, config.layer_decay)
  return optax.chain(
      optax.scale_by_adam(b1=config.b1, b2=config.b2, eps=config.eps),
      optax.add_decayed_weights(config.weight_decay, mask=weight_decay_mask),
      optax.scale_by_learning_rate(lr),
      # Layer-wise decay scales the whole update, weight decay included (MAE's param groups
      # scale the lr of each group, which is the same).
      optax.stateless(lambda updates, _: jax.tree.map(lambda u, s: u * s, updates, scales)))


def train_step(state: FineTuneState, batch, *, model, tx, lr, label_smoothing: float,
               layer_groups: tuple = ()):
  def loss_fn(params):
    logits, updates = model.apply({'params': params, 'batch_stats': state.batch_stats},
                                  batch['image'], train=True, mutable=['batch_stats'])
    loss = classification.cross_entropy(logits, batch['label'], label_smoothing)
    return loss, (logits, updates.get('batch_stats', state.batch_stats))

  (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = dict(loss=loss, lr=lr(state.step), grad_norm=optax.tree.norm(grads),
                 train_top1=jnp.mean(jnp.argmax(logits, -1) == batch['label']))
  if layer_groups:  # for the loop's finite check, which names the first non-finite group
    metrics['grad_inf'] = models.group_inf_norms(grads, layer_groups)
  return state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                       opt_state=opt_state), metrics


def init_state(encoder_variables, *, model, tx, image_shape, seed: int) -> FineTuneState:
  """The classifier with the encoder's weights in its backbone and a fresh head."""
  v = model.init(jax.random.key(seed), jnp.zeros((1,) + tuple(image_shape)), train=False)
  params = dict(v['params'], backbone=encoder_variables['params'])
  batch_stats = dict(v.get('batch_stats', {}))
  if 'batch_stats' in encoder_variables:
    batch_stats['backbone'] = encoder_variables['batch_stats']
  return FineTuneState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                       opt_state=tx.init(params))


def build(config, encoder_path: str, steps_per_epoch: int, num_classes: int, sharding=None):
  """(model, encoder variables, model.json, tx, lr schedule, total steps) of a fine-tuning run.

  The encoder's variables are placed on `sharding` (default: the first local device).
  """
  info = encoder_lib.read_model_json(encoder_path)
  image_size = config.image_size or info['image_size']
  overrides = config.model_overrides
  backbone, variables = encoder_lib.load_encoder(
      encoder_path, image_size=image_size, dtype=jnp.dtype(config.dtype),
      sharding=sharding, **(overrides.to_dict() if overrides else {}))
  model = Classifier(backbone, num_classes)
  lr, total = learning_rate_schedule(config, steps_per_epoch)
  abstract = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1, image_size, image_size,
                                                       info['channels'])), train=False))
  tx = build_optimizer(config, abstract['params'], backbone, lr)
  return model, variables, dict(info, image_size=image_size), tx, lr, total


def _data_config(config, info):
  d = config.data
  mean = d.mean or info['mean']
  std = d.std or info['std']
  return d, mean, std


@dataclasses.dataclass
class Top1:
  """Evaluator: top-1 of the classifier on the eval split (resize + centre crop)."""
  model: nn.Module
  source: Source
  sharding: Any
  batch_size: int
  image_size: int
  mean: tuple
  std: tuple

  def __post_init__(self):
    self._count = jax.jit(lambda s, b: classification.count_correct(
        self.model.apply({'params': s.params, 'batch_stats': s.batch_stats}, b['image'],
                         train=False), b['label'], b['mask']))

  def run(self, state) -> dict:
    correct = 0
    for batch in pipeline.eval_batches(self.source, sharding=self.sharding,
                                       global_batch=self.batch_size, image_size=self.image_size,
                                       mean=self.mean, std=self.std):
      correct = correct + self._count(state, batch)
    return {'top1': float(jax.device_get(correct)) / self.source.num_examples}


def run(encoder_path: str, config, workdir: str, *, train_source: Optional[Source] = None,
        eval_source: Optional[Source] = None, mesh: Optional[Mesh] = None) -> dict:
  """Fine-tunes the encoder in `encoder_path` per `config`; writes metrics and result.json to
  `workdir`; returns the result (top1 on the eval split, and the run's settings).

  SIGTERM/SIGINT save the step and raise preemption.Preempted; a step that is not finite raises
  loop.DivergenceError and is not saved. Rerunning the same call resumes.
  """
  parallel.check_batch_size(config.batch_size, 'batch_size')
  parallel.check_batch_size(config.eval_batch_size, 'eval_batch_size')
  with preemption.Watcher() as watcher:
    return _fine_tune(encoder_path, config, workdir, train_source, eval_source, mesh, watcher)


def _fine_tune(encoder_path, config, workdir, train_source, eval_source, mesh, watcher) -> dict:
  mesh = mesh or parallel.make_mesh(tuple(tuple(a) for a in config.mesh))
  primary = jax.process_index() == 0
  if primary:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      f.write(config.to_json_best_effort(indent=2))
  d = config.data
  train_source = train_source or sources.get_source(d, d.train_split)
  eval_source = eval_source or sources.get_source(d, d.eval_split)
  spe = pipeline.steps_per_epoch(train_source, config.batch_size)

  replicated, data_sharding = parallel.replicated(mesh), parallel.batch_sharding(mesh)
  model, variables, info, tx, lr, total = build(config, encoder_path, spe,
                                                train_source.num_classes, sharding=replicated)
  _, mean, std = _data_config(config, info)
  size = info['image_size']
  init = jax.jit(lambda v: init_state(v, model=model, tx=tx, seed=config.seed,
                                      image_shape=(size, size, info['channels'])),
                 out_shardings=replicated)
  checkpointer = ckpt_lib.Checkpointer(workdir, config, config.checkpoint_every_steps,
                                       config.keep_checkpoints,
                                       config.async_checkpointing)
  # The config is checked before anything compiles; eval_shape only traces.
  abstract = jax.eval_shape(init, variables)
  state, meta = checkpointer.resume(jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated), abstract))
  start_step = meta['step'] if meta else 0
  if state is None:
    state = init(variables)
  else:
    logging.info('Resumed fine-tuning from %s at step %d.', checkpointer.directory, start_step)
  del variables  # the state holds (replicated copies of) them now
  layer_groups = tuple(models.layer_groups(abstract.params))
  step_fn = jax.jit(
      lambda s, b: train_step(s, b, model=model, tx=tx, lr=lr,
                              label_smoothing=config.label_smoothing, layer_groups=layer_groups),
      in_shardings=(replicated, data_sharding), out_shardings=(replicated, replicated),
      donate_argnums=0)
  top1 = Top1(model, eval_source, data_sharding, config.eval_batch_size, size, tuple(mean),
              tuple(std))

  batches = labelled.train_batches(train_source, sharding=data_sharding,
                                   global_batch=config.batch_size, seed=config.seed,
                                   start_step=start_step, image_size=size, mean=mean, std=std,
                                   crop_scale=config.crop_scale)
  stop_at = min(total, config.stop_after_steps or total)
  eval_every = int(round(config.eval_every_epochs * spe)) if config.eval_every_epochs else 0
  logging.info('Fine-tuning %s: %d steps (%d/epoch), %d classes, image size %d.', encoder_path,
               total, spe, train_source.num_classes, size)
  writer = loop_lib.MetricsWriter(workdir, resume_step=start_step)
  loop = loop_lib.Loop(
      writer=writer, steps_per_epoch=spe, examples_per_step=config.batch_size,
      log_every=config.log_every_steps, checkpointer=checkpointer,
      checkpoint_every=config.checkpoint_every_steps, seed=config.seed, watcher=watcher,
      check=functools.partial(loop_lib.check_step, groups=layer_groups,
                              checkpoint_dir=checkpointer.directory,
                              advice='Lower base_lr or raise warmup_epochs'),
      checked=('loss', 'grad_inf'), vectors={'grad_inf': layer_groups}, total_steps=total)
  t0 = time.time()
  try:
    state, summary = loop.run(state, step_fn, batches, start_step=start_step, stop_at=stop_at,
                              evaluators=[loop_lib.Every(top1, eval_every, at_end=True)],
                              evaluations_pending=loop_lib.evaluations_pending(meta))
    if 'top1' not in summary:  # rerun after the end: nothing left to train
      summary = top1.run(state)
  finally:
    checkpointer.close()
    writer.close()   # nothing outlives the run (see train.py)
    batches.close()
  result = dict(top1=summary['top1'], steps=int(stop_at), epochs=stop_at / spe,
                resumed_from=start_step, encoder=os.path.abspath(encoder_path),
                eval_examples=int(eval_source.num_examples), seconds=round(time.time() - t0, 1))
  if primary:
    with open(os.path.join(workdir, 'result.json'), 'w') as f:
      json.dump(result, f, indent=2)
  logging.info('Fine-tuning: top-1 %.4f after %d steps.', result['top1'], stop_at)
  return result
