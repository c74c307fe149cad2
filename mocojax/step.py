"""The pretraining train step and the one way to set it up on a mesh: `setup(config, mesh, ...)`.

The trainer, the planner (plan.py), the step benchmark (bench/train_step.py) and the tests all
get their state layout and jitted step from `setup`, so each of them runs the same program. This
module imports neither TensorFlow nor clu: the step can be timed on a machine that has only
jax, flax, optax (and ml_collections for the configs).

The train state holds everything a step changes; the step is a pure function
(state, batch) -> (state, metrics), jitted with the batch split over every mesh axis, the state
laid out by `parallel.state_shardings` (replicated on the default data-parallel mesh; large
parameters and their optimizer state split over 'fsdp' when the mesh has that axis), and the
state's buffers donated.
"""

import dataclasses
import functools
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax

from mocojax import methods
from mocojax import models
from mocojax import momentum as momentum_lib
from mocojax import optim
from mocojax import parallel
from mocojax.evaluation import online_probe


@flax.struct.dataclass
class TrainState:
  step: jax.Array                 # number of optimizer steps taken
  params: Any                     # base encoder (e.g. backbone, projector, predictor)
  batch_stats: Any                # its BN running statistics
  momentum_params: Any            # EMA of the sub-trees of params the method's init copied;
                                  # never optimised; {} for a method without a momentum encoder
  momentum_batch_stats: Any
  opt_state: Any
  method_state: Any               # e.g. the v1/v2 queue; {} for most methods
  rng: jax.Array                  # folded with the step for per-step randomness
  probe: Any = None               # online linear probe {'params', 'opt_state'}, or None



# ----------------------------------------------------------------------------------------------
# The step.
# ----------------------------------------------------------------------------------------------
def train_step(state: TrainState, batch, *, method, tx, lr_schedule, momentum_schedule,
               grad_probes: dict, layer_groups: tuple = (), probe_tx=None):
  """One pretraining step of `method`. Pure: (state, batch) -> (state, metrics)."""
  momentum_metrics, momentum_params = {}, state.momentum_params
  if method.has_momentum_encoder:
    # The MoCo reference updates the key encoder at the start of each forward pass, so the
    # keys of step t come from the encoder averaged with the base parameters of step t-1.
    m = momentum_schedule(state.step)
    momentum_params = momentum_lib.ema_update(state.momentum_params, state.params, m)
    momentum_metrics = dict(momentum=m)
  rng = jax.random.fold_in(state.rng, state.step)

  def loss_fn(params):
    return method.loss(params, state, momentum_params, batch, rng)

  (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)

  metrics = dict(loss=loss, lr=lr_schedule(state.step), **momentum_metrics,
                 grad_norm=optax.tree.norm(grads), param_norm=optax.tree.norm(params),
                 update_norm=optax.tree.norm(updates), **aux['metrics'])
  # The v3 paper's Fig. 5 signals: the infinity-norm of first-layer and last-block gradients.
  for name, prefix in grad_probes.items():
    metrics[f'grad_max/{name}'] = models.max_abs_under(grads, prefix)
  # ... and of every layer group, input to output (the divergence check reads it).
  if layer_groups:
    metrics['grad_inf'] = models.group_inf_norms(grads, layer_groups)
  probe = state.probe
  if probe is not None:
    probe, probe_metrics = online_probe.update(probe, aux['features'], batch['label'], probe_tx)
    metrics.update(probe_metrics)
  new_state = state.replace(
      step=state.step + 1, params=params, batch_stats=aux['batch_stats'],
      momentum_params=momentum_params, momentum_batch_stats=aux['momentum_batch_stats'],
      opt_state=opt_state, method_state=aux['method_state'], probe=probe)
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


def build(config, steps_per_epoch: int, channels: int, num_classes: int = 0):
  """Method, the pure step and init, and the number of steps of a config (unjitted).

  With num_classes > 0 and config.online_probe.enabled, the state carries an online probe.
  """
  dtype = jnp.dtype(config.dtype)
  method = methods.build_method(config, dtype)
  warmup, total = optim.schedule_steps(config, steps_per_epoch)
  del warmup
  sample = jnp.zeros((1, config.data.image_size, config.data.image_size, channels))
  abstract_params = jax.eval_shape(lambda: method.init(jax.random.key(0), sample))['params']
  tx, lr = optim.build_optimizer(config, abstract_params, steps_per_epoch)
  m = None  # a method without a momentum encoder reads no config.momentum
  if method.has_momentum_encoder:
    m = momentum_lib.momentum_schedule(config.momentum.base, total, config.momentum.cosine)
  probe_tx = None
  if num_classes and config.online_probe.enabled:
    probe_tx = online_probe.optimizer(config.online_probe)
  step_fn = functools.partial(train_step, method=method, tx=tx, lr_schedule=lr,
                              momentum_schedule=m, grad_probes=models.grad_probes(config.model),
                              layer_groups=tuple(models.layer_groups(abstract_params)),
                              probe_tx=probe_tx)
  init_fn = functools.partial(init_state, method=method, tx=tx, probe_tx=probe_tx,
                              num_classes=num_classes)
  return method, step_fn, init_fn, total


@dataclasses.dataclass(frozen=True)
class Setup:
  """A config's step on a mesh, nothing compiled yet."""
  method: Any
  abstract_state: TrainState      # ShapeDtypeStructs carrying the state's shardings
  batch_sharding: Any             # the batch split over every mesh axis
  init: Callable                  # rng -> TrainState, created already sharded (jitted)
  step: Callable                  # (state, batch) -> (state, metrics), jitted, state donated
  total_steps: int
  layer_groups: tuple             # the order of metrics['grad_inf']


def setup(config, mesh, steps_per_epoch: int, channels: int, num_classes: int = 0) -> Setup:
  """The one step set-up: build, state shapes (eval_shape only traces), shardings, jitted
  init and step. The step is wrapped by `parallel.gather_parameters`, so an FSDP mesh runs the
  program the trainer runs."""
  method, step_fn, init_fn, total = build(config, steps_per_epoch, channels, num_classes)
  size = config.data.image_size
  sample = jnp.zeros((1, size, size, channels))
  abstract = jax.eval_shape(init_fn, jax.random.key(0), sample)
  shardings = parallel.state_shardings(abstract, mesh, config.sharding_rules,
                                       config.fsdp_min_size)
  batch_sharding = parallel.batch_sharding(mesh)
  init = jax.jit(init_fn, out_shardings=shardings)
  step = jax.jit(parallel.gather_parameters(step_fn, mesh),
                 in_shardings=(shardings, batch_sharding),
                 out_shardings=(shardings, parallel.replicated(mesh)), donate_argnums=0)
  return Setup(
      method=method,
      abstract_state=jax.tree.map(
          lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings),
      batch_sharding=batch_sharding, init=lambda rng: init(rng, sample), step=step,
      total_steps=total, layer_groups=step_fn.keywords['layer_groups'])
