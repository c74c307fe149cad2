"""Self-supervised objectives by name: `build_method(config)`."""

import jax.numpy as jnp

METHODS = ('mocov3',)


def build_method(config, dtype=jnp.float32):
  if config.method == 'mocov3':
    from mocojax.methods import mocov3
    return mocov3.MoCoV3(config, dtype)
  raise ValueError(f'config.method={config.method!r} is unknown; use one of {METHODS}.')
