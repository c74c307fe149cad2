"""The device mesh and how arrays are laid out on it.

Parallelism is `jax.jit` over a `Mesh` (no pmap). The global batch is split over every mesh
axis; the train state is laid out by `config.sharding_rules`.

  config.mesh = (('data', -1),)                  # data parallel: everything replicated
  config.mesh = (('data', 2), ('fsdp', 4))       # + parameters sharded 4 ways (ZeRO-3 / FSDP)

`config.sharding_rules` is a list of (regex, rule) pairs matched, first match wins, against a
parameter's path (e.g. 'backbone/blocks_3/fc1/kernel', as `jax.tree_util.keystr` spells it
with '/'). A rule is either
  - a PartitionSpec-like tuple, e.g. (None, 'fsdp'), applied as written; or
  - a mesh axis name, e.g. 'fsdp': split the parameter over that axis along its largest
    dimension that the axis size divides, if the parameter has at least `fsdp_min_size`
    elements. When the mesh has no such axis (the default data-parallel mesh) the rule is
    a no-op, so `(('.*', 'fsdp'),)` can be the default and FSDP is switched on by the mesh.
Parameters matching no rule are replicated. What mirrors a parameter (its momentum-encoder
copy, its optimizer moments) gets the parameter's layout; every other leaf of the state (step,
rng, BN statistics, v1/v2 queue, probe) is replicated.

Under FSDP the trainer wraps the step in `gather_parameters`: the encoders compute with
all-gathered whole parameters, so activations stay split over the batch and the forward and
backward passes are the data-parallel program, while the optimizer update and the stored
state stay split (the gradient is reduced and sliced; XLA's GPU pipeline fuses the two into a
reduce-scatter, the CPU one does not). Losses and parameters equal data parallel's up to
float rounding (tests/test_parallel.py).
"""

import re
from typing import Any, Sequence

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


# Parameters below this many elements stay replicated under an axis-name rule: splitting a
# bias or a norm scale saves nothing worth an extra collective.
FSDP_MIN_SIZE = 2**14


def path_name(path) -> str:
  """'backbone/blocks_3/fc1/kernel' for a key path (dict keys, attributes and indices alike)."""
  return jax.tree_util.keystr(path, simple=True, separator='/')


def _axis_size(mesh: Mesh, axis) -> int:
  names = axis if isinstance(axis, tuple) else (axis,)
  return int(np.prod([mesh.shape[n] for n in names]))


def _largest_divisible_dim(shape, size: int):
  for d in sorted(range(len(shape)), key=lambda d: -shape[d]):  # stable: first of equal dims
    if shape[d] % size == 0:
      return d
  return None


def param_spec(name: str, shape: Sequence[int], mesh: Mesh, rules,
               min_size: int = FSDP_MIN_SIZE) -> P:
  """The PartitionSpec of one parameter under `rules`; raises on a rule that cannot apply."""
  for pattern, rule in rules:
    if not re.fullmatch(pattern, name):
      continue
    if isinstance(rule, str):  # an axis name: automatic FSDP placement
      if rule not in mesh.axis_names or mesh.shape[rule] == 1 or int(np.prod(shape)) < min_size:
        return P()
      d = _largest_divisible_dim(shape, mesh.shape[rule])
      if d is None:  # e.g. an odd-sized dimension: correct, just not split
        return P()
      return P(*([None] * d + [rule]))
    spec = P(*[tuple(a) if isinstance(a, list) else a for a in rule])
    if len(spec) > len(shape):
      raise ValueError(f'sharding rule {pattern!r}: {tuple(spec)} has more entries than '
                       f'{name} has dimensions {tuple(shape)}.')
    for dim, axis in zip(shape, spec):
      if axis is None:
        continue
      for a in axis if isinstance(axis, tuple) else (axis,):
        if a not in mesh.axis_names:
          raise ValueError(f'sharding rule {pattern!r} names mesh axis {a!r}, but config.mesh '
                           f'has only {mesh.axis_names}.')
      if dim % _axis_size(mesh, axis):
        raise ValueError(f'sharding rule {pattern!r}: {name} {tuple(shape)} cannot be split '
                         f'{_axis_size(mesh, axis)} ways along a dimension of size {dim}.')
    return spec
  return P()


def state_shardings(abstract_state, mesh: Mesh, rules=(), min_size: int = FSDP_MIN_SIZE) -> Any:
  """NamedShardings for every leaf of a train state (arrays or ShapeDtypeStructs).

  Parameters are the leaves under `abstract_state.params`. Any other leaf whose path ends in a
  parameter's path and has its shape (momentum_params/backbone/..., opt_state/.../mu/
  backbone/...) gets that parameter's sharding; the rest is replicated. Optimizer moments
  with a parameter's shape but another path (none in optax's adamw/lamb/lars/sgd) would be
  replicated, which is correct, only not memory-optimal.
  """
  rules = tuple(rules or ())
  specs = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(abstract_state.params):
    specs[path_name(path)] = (tuple(leaf.shape), param_spec(path_name(path), leaf.shape, mesh,
                                                             rules, min_size))

  def leaf_sharding(path, leaf):
    parts = path_name(path).split('/')
    shape = tuple(getattr(leaf, 'shape', ()))
    for i in range(1, len(parts)):  # longest suffix first; parts[0] is the state field
      shape_and_spec = specs.get('/'.join(parts[i:]))
      if shape_and_spec and shape_and_spec[0] == shape:
        return NamedSharding(mesh, shape_and_spec[1])
    return NamedSharding(mesh, P())

  return jax.tree_util.tree_map_with_path(leaf_sharding, abstract_state)


def gather_parameters(step_fn, mesh: Mesh):
  """Wraps a train step so that it computes with whole parameters, all-gathered on entry.

  Sharded parameters alone leave XLA's sharding propagation free to carry their split into
  the activations: activations split over features and all-reduced, v3 logits of [B/data, B]
  per device (a tensor-parallel layout) instead of activations split over the whole batch.
  This wrapper pins the three parameter sets the encoders compute with to whole copies: the
  base parameters and the stored momentum parameters on entry, and the step's new momentum
  parameters, which are the EMA that the key encoder runs with in the same step (constraining
  that value on the way out pins it at its definition, before it is used). The forward and
  backward passes are then the data-parallel program; the optimizer update and the stored
  state stay split (the jit's out_shardings). Peak memory holds one whole copy of the
  parameters, of the momentum parameters and of the gradients. A no-op on a data-parallel
  mesh, where all of these are whole already.
  """
  whole = NamedSharding(mesh, P())

  def gather(tree):
    return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, whole), tree)

  def step(state, batch):
    state = state.replace(params=gather(state.params),
                          momentum_params=gather(state.momentum_params))
    new_state, metrics = step_fn(state, batch)
    return new_state.replace(momentum_params=gather(new_state.momentum_params)), metrics

  return step
