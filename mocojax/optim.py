"""Optimizers, the learning-rate schedule and parameter masks.

Peak lr = base_lr * global_batch / 256; linear warmup from 0, then half-cosine to 0, per step
(the reference's per-iteration `adjust_learning_rate`). Durations come in epochs and are
converted with the run's steps per epoch, so a batch-size override keeps the schedule right.

Parameters frozen by the recipe (the random patch projection) are labelled 'frozen' and get a
zero update: optax would otherwise apply weight decay to a parameter whose gradient is zero.
"""

import jax
import optax

from mocojax import models, parallel

OPTIMIZERS = ('adamw', 'lamb', 'lars', 'sgd')


def peak_learning_rate(config) -> float:
  return config.optimizer.base_lr * config.batch_size / 256


def schedule_steps(config, steps_per_epoch: int):
  """(warmup_steps, total_steps) of the run; config.total_steps, if set, replaces epochs."""
  total = config.get('total_steps') or int(round(config.epochs * steps_per_epoch))
  warmup = int(round(config.warmup_epochs * steps_per_epoch))
  if config.get('total_steps') and config.epochs:
    warmup = int(round(total * config.warmup_epochs / config.epochs))
  if total <= 0:
    raise ValueError(f'The run has {total} steps: raise config.epochs ({config.epochs}) or set '
                     'config.total_steps.')
  return min(warmup, total - 1), total


def learning_rate_schedule(config, steps_per_epoch: int):
  warmup, total = schedule_steps(config, steps_per_epoch)
  peak = peak_learning_rate(config)
  if config.optimizer.get('schedule', 'cosine') == 'steps':
    # v1: step decay by 0.1 at the given epochs (no warmup).
    boundaries = {int(round(e * steps_per_epoch)): 0.1 for e in config.optimizer.decay_epochs}
    return optax.piecewise_constant_schedule(peak, boundaries)
  return warmup_cosine(peak, warmup, total)


def warmup_cosine(peak: float, warmup: int, total: int, end: float = 0.0):
  """Linear warmup from 0 to `peak` over `warmup` steps, then half-cosine to `end` at `total`
  (pretraining's schedule, and fine-tuning's with its min_lr)."""
  if warmup == 0:
    return optax.cosine_decay_schedule(peak, total, alpha=end / peak)
  return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, total, end)


def frozen_labels(params, frozen_prefixes):
  """'frozen' for parameters under any of the given path prefixes, 'train' otherwise."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: 'frozen' if any(parallel.path_name(path).startswith(p)
                                      for p in frozen_prefixes)
      else 'train', params)


def _not_1d(params):
  # LARS convention: no weight decay and no trust ratio for biases and norm parameters.
  return jax.tree.map(lambda p: p.ndim > 1, params)


def _lars(lr, weight_decay, momentum, trust_coefficient):
  """LARS as the MoCo v3 reference: momentum accumulates the trust-scaled update, then lr.

  (optax.lars applies lr before the momentum trace, which differs while lr changes.)
  """
  return optax.chain(
      optax.add_decayed_weights(weight_decay, mask=_not_1d),
      optax.masked(optax.scale_by_trust_ratio(trust_coefficient=trust_coefficient), _not_1d),
      optax.trace(decay=momentum, nesterov=False),
      optax.scale_by_learning_rate(lr))


def _base_optimizer(config, lr):
  o = config.optimizer
  name = o.name
  if name == 'adamw':
    return optax.adamw(lr, b1=o.get('b1', 0.9), b2=o.get('b2', 0.999), eps=o.get('eps', 1e-8),
                       weight_decay=o.weight_decay)
  if name == 'lamb':
    return optax.lamb(lr, b1=o.get('b1', 0.9), b2=o.get('b2', 0.999), eps=o.get('eps', 1e-6),
                      weight_decay=o.weight_decay)
  if name == 'lars':
    return _lars(lr, o.weight_decay, o.get('momentum', 0.9), o.get('trust_coefficient', 0.001))
  if name == 'sgd':
    # PyTorch SGD: d = g + wd * p; buf = mu * buf + d; p -= lr * buf.
    return optax.chain(optax.add_decayed_weights(o.weight_decay),
                       optax.trace(decay=o.get('momentum', 0.9), nesterov=False),
                       optax.scale_by_learning_rate(lr))
  raise ValueError(f'optimizer.name={name!r} is unknown; use one of {OPTIMIZERS}.')


def build_optimizer(config, params, steps_per_epoch: int):
  """Returns (optax transformation, lr schedule)."""
  lr = learning_rate_schedule(config, steps_per_epoch)
  tx = _base_optimizer(config, lr)
  prefixes = models.frozen_prefixes(config.model)
  if prefixes:
    labels = frozen_labels(params, prefixes)
    tx = optax.multi_transform({'train': tx, 'frozen': optax.set_to_zero()}, labels)
  return tx, lr
