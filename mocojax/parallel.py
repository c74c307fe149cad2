"""The device mesh and how arrays are laid out on it.

Parallelism is `jax.jit` over a `Mesh` (no pmap). The default mesh has one axis, 'data', over
every device of every process: the global batch is split over it and the train state is
replicated. Other layouts (FSDP) add rules here, not in the trainer.
"""

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


def make_mesh(mesh_config=(('data', -1),)) -> Mesh:
  names = tuple(name for name, _ in mesh_config)
  sizes = [size for _, size in mesh_config]
  n = jax.device_count()
  if sizes.count(-1) > 1:
    raise ValueError(f'config.mesh={mesh_config}: at most one axis may be -1.')
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    sizes[sizes.index(-1)] = n // known
  if int(np.prod(sizes)) != n:
    raise ValueError(f'config.mesh={mesh_config} needs {int(np.prod(sizes))} devices, '
                     f'but {n} are present.')
  # Auto axes: XLA propagates shardings (no sharding-in-types), as the step expects.
  devices = mesh_utils.create_device_mesh(tuple(sizes), allow_split_physical_axes=True)
  return Mesh(devices, names)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over every mesh axis."""
  return NamedSharding(mesh, P(mesh.axis_names))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def check_batch_size(global_batch: int, what: str = 'config.batch_size'):
  """The global batch must split evenly over devices and hosts; say so before compiling."""
  n, hosts = jax.device_count(), jax.process_count()
  if global_batch % n:
    lower, upper = global_batch // n * n, (global_batch // n + 1) * n
    raise ValueError(f'{what}={global_batch} is not divisible by the {n} devices; '
                     f'use a multiple of {n}, e.g. {lower or upper} or {upper}.')
  if global_batch % hosts:
    raise ValueError(f'{what}={global_batch} is not divisible by the {hosts} processes.')
