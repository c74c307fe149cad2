"""End-to-end fine-tuning of an exported encoder with labels.

The exported backbone plus a new Linear head (zero-initialised: the first logits are all equal,
and the backbone's features reach the loss unchanged), trained together with AdamW, linear
warmup then half-cosine, cross-entropy with label smoothing, and optionally layer-wise lr decay
for a ViT (as BEiT/MAE fine-tune): with L blocks, the patch projection, [CLS] and position
table are layer 0, block i is layer i + 1, the final norm and the head layer L + 1, and
layer l's update is scaled by layer_decay ** (L + 1 - l). Biases, norm parameters, [CLS] and
the position table get no weight decay (timm's no_weight_decay set).

Training images are RandomResizedCrop + flip (classification.train_dataset); the recipes of
the papers add RandAugment, mixup/cutmix and drop-path, which this module does not have.
Reports top-1 on the eval split (resize + centre crop).

Checkpoints (orbax, atomic, as pretraining's: state plus data position plus the run-defining
config) go to <workdir>/checkpoints every `checkpoint_every_steps`; rerunning the same command
resumes from the latest one and continues the same run, batch for batch.
"""

import json
import os
import time
from typing import Any, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from clu import metric_writers
from jax.sharding import Mesh

from mocojax import checkpoint as ckpt_lib
from mocojax import models, parallel
from mocojax.data import pipeline, sources
from mocojax.data.sources import Source
from mocojax.evaluation import classification
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
  total = config.get('total_steps') or int(round(config.epochs * steps_per_epoch))
  warmup = int(round(config.warmup_epochs * steps_per_epoch))
  if config.get('total_steps') and config.epochs:
    warmup = int(round(total * config.warmup_epochs / config.epochs))
  if total <= 0:
    raise ValueError(f'The run has {total} steps: raise epochs or set total_steps.')
  peak = config.base_lr * config.batch_size / 256
  warmup = min(warmup, total - 1)
  if warmup == 0:
    return optax.cosine_decay_schedule(peak, total, alpha=config.min_lr / peak), total
  return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, total, config.min_lr), total


def build_optimizer(config, params, backbone: nn.Module, lr):
  scales = layer_scales(params, backbone, config.layer_decay)
  return optax.chain(
      optax.scale_by_adam(b1=config.b1, b2=config.b2, eps=config.eps),
      optax.add_decayed_weights(config.weight_decay, mask=weight_decay_mask),
      optax.scale_by_learning_rate(lr),
      # Layer-wise decay scales the whole update, weight decay included (MAE's param groups
      # scale the lr of each group, which is the same).
      optax.stateless(lambda updates, _: jax.tree.map(lambda u, s: u * s, updates, scales)))


def train_step(state: FineTuneState, batch, *, model, tx, lr, label_smoothing: float):
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
  image_size = config.get('image_size') or info['image_size']
  overrides = config.get('model_overrides')
  backbone, variables = encoder_lib.load_encoder(
      encoder_path, image_size=image_size, dtype=jnp.dtype(config.get('dtype', 'float32')),
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
  mean = d.get('mean') or info['mean']
  std = d.get('std') or info['std']
  return d, mean, std


def run(encoder_path: str, config, workdir: str, *, train_source: Optional[Source] = None,
        eval_source: Optional[Source] = None, mesh: Optional[Mesh] = None) -> dict:
  """Fine-tunes the encoder in `encoder_path` per `config`; writes metrics and result.json to
  `workdir`; returns the result (top1 on the eval split, and the run's settings)."""
  parallel.check_batch_size(config.batch_size, 'batch_size')
  parallel.check_batch_size(config.eval_batch_size, 'eval_batch_size')
  mesh = mesh or parallel.make_mesh(tuple(tuple(a) for a in config.mesh))
  primary = jax.process_index() == 0
  if primary:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      f.write(config.to_json_best_effort(indent=2))
  writer = metric_writers.create_default_writer(workdir, just_logging=not primary)
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
                                       config.get('async_checkpointing', True))
  # The config is checked before anything compiles; eval_shape only traces.
  state, meta = checkpointer.resume(jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated),
      jax.eval_shape(init, variables)))
  start_step = meta['step'] if meta else 0
  if state is None:
    state = init(variables)
  else:
    logging.info('Resumed fine-tuning from %s at step %d.', checkpointer.directory, start_step)
  del variables  # the state holds (replicated copies of) them now
  step_fn = jax.jit(
      lambda s, b: train_step(s, b, model=model, tx=tx, lr=lr,
                              label_smoothing=config.label_smoothing),
      in_shardings=(replicated, data_sharding), out_shardings=(replicated, replicated),
      donate_argnums=0)
  count = jax.jit(
      lambda s, b: classification.count_correct(
          model.apply({'params': s.params, 'batch_stats': s.batch_stats}, b['image'],
                      train=False), b['label'], b['mask']),
      in_shardings=(replicated, data_sharding), out_shardings=replicated)

  def evaluate(state):
    correct = 0
    for batch in pipeline.eval_batches(eval_source, sharding=data_sharding,
                                       global_batch=config.eval_batch_size, image_size=size,
                                       mean=mean, std=std):
      correct = correct + count(state, batch)
    return float(jax.device_get(correct)) / eval_source.num_examples

  metrics_log = os.path.join(workdir, 'metrics.jsonl')
  if primary and start_step == 0:
    open(metrics_log, 'w').close()  # a fresh run starts its log afresh; a resumed one appends

  def write(step, scalars):
    writer.write_scalars(step, scalars)
    if primary:
      with open(metrics_log, 'a') as f:
        f.write(json.dumps({'step': step, **{k: float(v) for k, v in scalars.items()}}) + '\n')

  batches = classification.train_batches(train_source, sharding=data_sharding,
                                         global_batch=config.batch_size, seed=config.seed,
                                         start_step=start_step, image_size=size, mean=mean,
                                         std=std, crop_scale=config.crop_scale)
  stop_at = min(total, config.get('stop_after_steps') or total)
  eval_every = int(round(config.eval_every_epochs * spe)) if config.eval_every_epochs else 0
  logging.info('Fine-tuning %s: %d steps (%d/epoch), %d classes, image size %d.', encoder_path,
               total, spe, train_source.num_classes, size)
  t0, pending = time.time(), []
  for step in range(start_step + 1, stop_at + 1):
    state, metrics = step_fn(state, next(batches))
    pending.append(metrics)
    if step % config.log_every_steps == 0 or step == stop_at:
      host = jax.device_get(pending)
      scalars = {k: float(np.mean([m[k] for m in host])) for k in host[0]}
      scalars['epoch'] = step / spe
      if not np.isfinite(scalars['loss']):
        raise FloatingPointError(f'Fine-tuning loss became {scalars["loss"]} at step {step}; '
                                 'lower base_lr or raise warmup_epochs.')
      write(step, scalars)
      pending = []
    if step % config.checkpoint_every_steps == 0 or step == stop_at:
      checkpointer.save(step, state, dict(seed=config.seed, next_step=step), force=True)
    if eval_every and step % eval_every == 0 and step < stop_at:
      write(step, {'top1': evaluate(state)})

  checkpointer.close()
  top1 = evaluate(state)
  write(stop_at, {'top1': top1})
  writer.flush()
  result = dict(top1=top1, steps=int(stop_at), epochs=stop_at / spe, resumed_from=start_step,
                encoder=os.path.abspath(encoder_path), eval_examples=int(eval_source.num_examples),
                seconds=round(time.time() - t0, 1))
  if primary:
    with open(os.path.join(workdir, 'result.json'), 'w') as f:
      json.dump(result, f, indent=2)
  logging.info('Fine-tuning: top-1 %.4f after %d steps.', top1, stop_at)
  return result
