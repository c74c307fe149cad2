"""Self-supervised objectives by name: `build_method(config)`."""

import jax.numpy as jnp

METHODS = ('mocov1', 'mocov2', 'mocov3')


def build_method(config, dtype=jnp.float32):
  if config.method == 'mocov3':
    from mocojax.methods import mocov3
    return mocov3.MoCoV3(config, dtype)
  if config.method in ('mocov1', 'mocov2'):
    # One implementation; the config (head, tau, schedule, augmentation) makes it v1 or v2.
    from mocojax.methods import mocov1v2
    return mocov1v2.MoCoV1V2(config, dtype)
  raise ValueError(f'config.method={config.method!r} is unknown; use one of {METHODS}.')


def check_config(config):
  """The method's own config checks (no data, no compile): for v1/v2, queue_size and BN groups
  against batch_size. build_method runs them too."""
  if config.method in ('mocov1', 'mocov2'):
    from mocojax.methods import mocov1v2
    mocov1v2.check_config(config)
