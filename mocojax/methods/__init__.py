"""Self-supervised objectives by name: the one registry, and `build_method(config)`.

A method is a class following `base.Method` in a file of its own; adding one is that file and
one line below (and its recipe configs). The step and the trainer know no method by name.
"""

import jax.numpy as jnp

from mocojax import validate
from mocojax.methods import base, byol, mocov1v2, mocov3, simclr

REGISTRY = {
    # One implementation for v1 and v2; the config (head, tau, schedule, augmentation) makes it
    # one or the other.
    'mocov1': mocov1v2.MoCoV1V2,
    'mocov2': mocov1v2.MoCoV1V2,
    'mocov3': mocov3.MoCoV3,
    'simclr': simclr.SimCLR,
    'byol': byol.BYOL,
}
METHODS = tuple(REGISTRY)


def method_class(config) -> type:
  """The registered class of config.method; a ConfigError naming the choices otherwise."""
  name = config.get('method')
  if name not in REGISTRY:
    raise validate.ConfigError(f'config.method={name!r} is not a registered method; use one of '
                               f'{METHODS} (mocojax/methods/__init__.py registers them).')
  return REGISTRY[name]


def check_config(config):
  """Raises validate.ConfigError listing the method's own problems with the config (e.g. v1/v2:
  queue_size and BN groups against batch_size); no data, no compile. build_method runs it."""
  lines = method_class(config).config_problems(config)
  if lines:
    raise validate.ConfigError('\n'.join(lines))


def build_method(config, dtype=jnp.float32) -> base.Method:
  check_config(config)
  return method_class(config)(config, dtype)
