"""What a method is to the step (the `Method` protocol), and the pieces methods share.

A method is one class in one file of methods/, registered by name in methods/__init__.py. The
step calls nothing else of it than the protocol below, and keeps in the train state what the
method hands back: its parameters and BN statistics, its momentum encoder's (or {} when it has
none: the step then applies no EMA) and its own `method_state` (the v1/v2 queue, {} for the
others). Shared here, so that no method imports another: `l2_normalize`, the backbone ->
projector (-> predictor) `Encoder` and its construction from config.head, the train-mode call
that threads BN statistics, the momentum copy made at init, and inference-mode features.
"""

from typing import Any, ClassVar, Optional, Protocol, TypedDict

import flax.linen as nn
import jax
import jax.numpy as jnp

from mocojax import models
from mocojax.models import heads


class Variables(TypedDict):
  """`Method.init`'s result: the method's slice of a fresh train state."""
  params: Any                 # what the optimizer updates
  batch_stats: Any            # their BN running statistics
  momentum_params: Any        # the momentum encoder's parameters; {} without one
  momentum_batch_stats: Any   # its BN running statistics; {} without one
  method_state: Any           # anything else the method carries from step to step, e.g. a queue


class Aux(TypedDict):
  """The second result of `Method.loss`: the method's slice of the next train state, and more."""
  batch_stats: Any
  momentum_batch_stats: Any
  method_state: Any
  metrics: dict               # extra scalars to log, e.g. instance accuracy
  features: jax.Array         # backbone features of view 1 under stop_gradient (online probe)


class StepState(Protocol):
  """What `Method.loss` reads of the train state (step.TrainState has these fields)."""
  batch_stats: Any
  momentum_batch_stats: Any
  method_state: Any


class Method(Protocol):
  """A self-supervised objective: its encoders, its state and its loss."""

  # True: the step updates `momentum_params` as an EMA of the parameters of the same names
  # (config.momentum's schedule) before calling `loss`. False: `momentum_params` stays {}.
  has_momentum_encoder: ClassVar[bool]
  # The reference linear probe (base_lr, epochs, schedule) of this method's papers, where it
  # differs from the backbone's (models/backbone.py): MoCo v1/v2's SGD at lr 30. None: the
  # backbone's.
  probe_recipe: ClassVar[Optional[dict]] = None

  @staticmethod
  def config_problems(config) -> list:
    """This method's own checks of a config, one line per problem (validate.py's wording);
    empty when the config is fine. validate.check lists them with every other problem."""

  def __init__(self, config, dtype=jnp.float32):
    """Builds the encoders from the config (methods.build_method checks the config first)."""

  def init(self, rng, images) -> Variables:
    """The variables of a fresh train state; `images` is a sample batch, for the shapes."""

  def loss(self, params, state: StepState, momentum_params, batch: dict, rng) -> tuple:
    """(scalar loss, Aux) of one step over the global batch {'view1', 'view2', ...}.
    `momentum_params` are already updated for this step; `rng` is this step's key."""

  def features(self, variables: dict, images) -> jax.Array:
    """Backbone features in inference mode (kNN, linear probe, export)."""


# ----------------------------------------------------------------------------------------------
# Shared pieces.
# ----------------------------------------------------------------------------------------------
def needs(config, setting: str, fix: str) -> list:
  """[] if the config has the top-level `setting`, else the line saying so (validate's wording)."""
  return [] if setting in config else [f'config.{setting} is missing; {fix}.']


def l2_normalize(x, eps=1e-12):
  # F.normalize: x / max(||x||, eps).
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


class Encoder(nn.Module):
  """backbone -> projector (-> predictor). Without a predictor it is e.g. a momentum encoder."""
  backbone: nn.Module
  projector: nn.Module
  predictor: Optional[nn.Module] = None

  def __call__(self, images, train: bool = True):
    """Returns (backbone features, head output)."""
    features = self.backbone(images, train=train)
    z = self.projector(features, train=train)
    return features, (self.predictor(z, train=train) if self.predictor is not None else z)


def mlp_encoder(config, dtype, predictor: bool) -> Encoder:
  """The backbone of config.model with the MLP heads of config.head (models/heads.py): a
  projector of head.proj_layers ending in BN and, if asked, a predictor of head.pred_layers."""
  h = config.head
  return Encoder(
      backbone=models.build_backbone(config.model, dtype),
      projector=heads.MLP(h.proj_layers, h.hidden_dim, h.out_dim, last_bn=True, dtype=dtype),
      predictor=(heads.MLP(h.pred_layers, h.hidden_dim, h.out_dim, last_bn=h.pred_last_bn,
                           dtype=dtype) if predictor else None))


def apply_train(module, params, batch_stats, images):
  """(module output, new BN statistics) of a train-mode call."""
  out, updates = module.apply({'params': params, 'batch_stats': batch_stats}, images,
                              train=True, mutable=['batch_stats'])
  return out, updates.get('batch_stats', batch_stats)


def with_momentum_copy(variables, momentum_keys: tuple, method_state=None) -> Variables:
  """Variables whose momentum encoder starts as a copy of the sub-trees `momentum_keys` of the
  parameters (and of their BN statistics); () makes no momentum encoder."""
  params, batch_stats = variables['params'], variables.get('batch_stats', {})
  return Variables(
      params=params, batch_stats=batch_stats,
      momentum_params={k: params[k] for k in momentum_keys},
      momentum_batch_stats={k: batch_stats[k] for k in momentum_keys if k in batch_stats},
      method_state={} if method_state is None else method_state)


def backbone_features(encoder: nn.Module, variables, images):
  """The `backbone` of an encoder module, applied in inference mode."""
  return encoder.apply(variables, images, train=False,
                       method=lambda m, x, train: m.backbone(x, train=train))


class BaseAndMomentum:
  """A base encoder with a predictor and a momentum encoder without one, both calling each
  view separately (MoCo v3 and BYOL): subclasses compute their loss from `forward`."""

  has_momentum_encoder = True
  # Sub-trees of the base parameters that the momentum encoder averages.
  momentum_keys = ('backbone', 'projector')

  def __init__(self, config, dtype=jnp.float32):
    self.base = mlp_encoder(config, dtype, predictor=True)
    self.momentum = mlp_encoder(config, dtype, predictor=False)

  def init(self, rng, images) -> Variables:
    """Variables of both encoders; the momentum encoder starts as a copy of the base one."""
    return with_momentum_copy(self.base.init(rng, images, train=True), self.momentum_keys)

  def forward(self, params, state: StepState, momentum_params, batch):
    """((q1, q2), (k1, k2), aux) for both views: q from the base encoder, k from the momentum
    encoder under stop_gradient. Each view is a separate call, so BN statistics are per view,
    and BN running statistics thread through the calls in the order the MoCo v3 reference
    makes them. aux is an Aux without metrics."""
    x1, x2 = batch['view1'], batch['view2']
    bs = state.batch_stats
    (f1, q1), bs = apply_train(self.base, params, bs, x1)
    (_, q2), bs = apply_train(self.base, params, bs, x2)
    mbs = state.momentum_batch_stats
    (_, k1), mbs = apply_train(self.momentum, momentum_params, mbs, x1)
    (_, k2), mbs = apply_train(self.momentum, momentum_params, mbs, x2)
    k1, k2 = jax.lax.stop_gradient(k1), jax.lax.stop_gradient(k2)
    # features: for the online linear probe, which must never move the encoder.
    aux = dict(batch_stats=bs, momentum_batch_stats=jax.lax.stop_gradient(mbs),
               method_state=state.method_state, features=jax.lax.stop_gradient(f1))
    return (q1, q2), (k1, k2), aux

  def features(self, variables, images):
    """Backbone features of the base encoder in inference mode (kNN, linear probe, export)."""
    return backbone_features(self.base, variables, images)
