"""A few train steps of a tiny MoCo v3 on any mesh, as the trainer runs them; also the worker
of the two-process test (`python tests/sharded_run.py --process_id=...`).

The model is the `tiny_config` fixture's (2-block ViT of width 40 on 28x28 images), with
head sizes (hidden 48, out 24) and a global batch (32) that share no dimension with any
parameter, so that the compiled program's collectives can be told apart by shape.
"""

import os
import sys

STEPS = 3
BATCH = 32


def config():
  from configs import demo
  c = demo.get_config()
  c.model.width, c.model.depth, c.model.num_heads, c.model.patch_size = 40, 2, 2, 7
  c.head.hidden_dim, c.head.out_dim = 48, 24
  c.batch_size = BATCH
  c.warmup_epochs, c.optimizer.base_lr = 0.0, 1e-2
  # Two parameters have an exactly-zero gradient (the key part of the qkv bias: softmax
  # ignores a per-query shift; the last LayerNorm bias: the projector's BN removes it). Adam
  # with eps 1e-8 turns the float noise of that zero into O(lr) updates, which differ between
  # any two layouts (1e-5 apart after 3 steps with eps 1e-6). eps 1e-3 bounds what noise
  # can do (lr * noise / eps) and keeps the comparisons about the layouts.
  c.optimizer.eps = 1e-3
  c.fsdp_min_size = 256  # shard the tiny model's matrices
  return c


def batches():
  """STEPS global batches, the same numbers in every process."""
  import numpy as np
  out = []
  for step in range(STEPS):
    rng = np.random.RandomState(step)
    out.append({f'view{v}': rng.standard_normal((BATCH, 28, 28, 1)).astype(np.float32)
                for v in (1, 2)})
  return out


def _local_rows(sharding, shape):
  """The contiguous block of global rows this process holds under a batch sharding."""
  spans = {(idx[0].start or 0, idx[0].stop or shape[0])
           for idx in sharding.addressable_devices_indices_map(shape).values()}
  start, stop = min(s for s, _ in spans), max(e for _, e in spans)
  assert sum(e - s for s, e in spans) == stop - start, spans  # contiguous, no repeats
  return slice(start, stop)


def run(c, mesh, steps: int = STEPS):
  """(state, losses, compiled step): `steps` steps of the trainer's jitted step."""
  import jax
  import jax.numpy as jnp
  from mocojax import step as step_lib
  setup = step_lib.setup(c, mesh, steps_per_epoch=10, channels=1)
  state, step, data = setup.init(jax.random.key(0)), setup.step, setup.batch_sharding
  losses, compiled = [], None
  for host_batch in batches()[:steps]:
    rows = _local_rows(data, host_batch['view1'].shape)
    batch = {k: jax.make_array_from_process_local_data(data, v[rows], v.shape)
             for k, v in host_batch.items()}
    if compiled is None:
      compiled = step.lower(state, batch).compile()
    state, metrics = compiled(state, batch)
    losses.append(float(metrics['loss']))
  return state, losses, compiled


def fetch(tree):
  """Whole numpy copies of (possibly sharded, possibly multi-process) arrays."""
  from jax.experimental import multihost_utils
  return multihost_utils.process_allgather(tree, tiled=True)


def _worker(argv):
  """One process of a localhost multi-process job; process 0 writes the results."""
  from absl import flags
  f = flags.FLAGS
  flags.DEFINE_integer('process_id', 0, '')
  flags.DEFINE_integer('num_processes', 2, '')
  flags.DEFINE_string('coordinator_address', None, '')
  flags.DEFINE_string('out', None, 'npz written by process 0')
  flags.DEFINE_string('mode', 'train', "'train', or 'check' (config check only)")
  flags.DEFINE_float('lr', None, 'a different base_lr (to make the configs differ)')
  f(argv)

  import jax
  from mocojax import distributed, parallel
  assert distributed.initialize(f.coordinator_address, f.num_processes, f.process_id)
  c = config()
  if f.lr is not None:
    c.optimizer.base_lr = f.lr
  distributed.check_same_config(c, 'workdir')
  if f.mode == 'check':
    return
  assert jax.process_count() == f.num_processes and jax.device_count() == 8
  mesh = parallel.make_mesh(tuple(tuple(a) for a in c.mesh))
  state, losses, _ = run(c, mesh)
  params = fetch(state.params)
  if jax.process_index() == 0:
    import numpy as np
    leaves = jax.tree_util.tree_leaves_with_path(params)
    np.savez(f.out, losses=np.asarray(losses),
             **{parallel.path_name(p): np.asarray(x) for p, x in leaves})


if __name__ == '__main__':
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  _worker(sys.argv)
