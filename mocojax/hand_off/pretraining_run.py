"""The base backbone of a pretraining run, restored from the run's workdir.

A run's workdir holds `config.json` (written by the trainer at start) and `checkpoints/<step>/`
with the whole TrainState. Everything downstream of pretraining (linear probe, export,
fine-tuning) needs only the base encoder's backbone: `params['backbone']` and, for BN backbones,
`batch_stats['backbone']`. Only those are read (orbax partial restore): the optimizer state and
the momentum encoder, three times the backbone's size under AdamW, never leave the disk.
"""

import dataclasses
import json
import os
from typing import Any, Optional

import flax.linen as nn
import jax
import ml_collections
import orbax.checkpoint as ocp
from jax.sharding import Mesh

from mocojax import checkpoint, models, parallel

# The sub-tree of TrainState.params / .batch_stats that is the base encoder's backbone (the
# encoder that gets gradients; the momentum encoder's copy is in momentum_params).
BACKBONE = 'backbone'


@dataclasses.dataclass
class PretrainedBackbone:
  config: ml_collections.ConfigDict   # the pretraining config, as the run wrote it
  step: int                           # the checkpoint's step
  module: nn.Module                   # the backbone; call with train=False for features
  variables: dict                     # {'params': ...} (+ 'batch_stats' for BN backbones)
  workdir: str

  def features(self, variables, images):
    """Backbone features in inference mode (BN on running statistics), as kNN computes them."""
    return self.module.apply(variables, images, train=False)


def load_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    raise FileNotFoundError(
        f'{path} not found: --workdir must be a pretraining run directory (the trainer writes '
        'config.json there when it starts).')
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def _manager(workdir: str) -> ocp.CheckpointManager:
  directory = os.path.abspath(os.path.join(workdir, 'checkpoints'))
  if not os.path.isdir(directory):
    raise FileNotFoundError(f'{directory} not found: the run at {workdir} saved no checkpoint.')
  # Handlers are named so that metadata can be read before any restore; the trainer saved
  # 'state' with StandardSave, whose on-disk format is the PyTree handler's.
  return ocp.CheckpointManager(
      directory,
      options=ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0),
      item_handlers={'state': ocp.PyTreeCheckpointHandler(), 'meta': ocp.JsonCheckpointHandler()})


def restore_backbone(workdir: str, step: Optional[int] = None,
                     mesh: Optional[Mesh] = None, dtype: Any = None) -> PretrainedBackbone:
  """Restores the base backbone of the run in `workdir` (latest step unless `step` is given).

  Arrays are placed replicated over `mesh` (default: all devices). `dtype` sets the module's
  compute dtype (default: the run's `config.dtype`); parameters stay as saved (float32).
  """
  config = load_config(workdir)
  manager = _manager(workdir)
  steps = manager.all_steps()
  if not steps:
    raise FileNotFoundError(f'{manager.directory} holds no complete checkpoint.')
  if step is None:
    step = manager.latest_step()
  elif step not in steps:
    raise ValueError(f'step {step} is not saved in {manager.directory}; saved steps: {steps}.')

  saved = manager.item_metadata(step)['state']
  saved = getattr(saved, 'tree', saved)
  if BACKBONE not in saved.get('params', {}):
    raise ValueError(f'The checkpoint at {manager.directory}/{step} has no params/{BACKBONE}; '
                     f'its params hold {sorted(saved.get("params", {}))}.')
  wanted = {'params': saved['params'][BACKBONE]}
  if BACKBONE in saved.get('batch_stats', {}):
    wanted['batch_stats'] = saved['batch_stats'][BACKBONE]

  mesh = mesh or parallel.make_mesh()
  replicated = parallel.replicated(mesh)
  abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=replicated),
                          wanted)
  # Restore into the TrainState's own layout ({'params': {'backbone': ...}}) and let orbax skip
  # every other leaf.
  target = {k: {BACKBONE: v} for k, v in abstract.items()}
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
      item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
      partial_restore=True))).state
  # The checksums the trainer saved with the step catch bytes changed on disk since.
  saved_sums = manager.restore(step, args=ocp.args.Composite(
      meta=ocp.args.JsonRestore())).meta.get('checksums')
  manager.close()
  if saved_sums is not None:
    sums, bad = checkpoint.fingerprint(restored)
    differ = [k for k in sums if saved_sums.get(k) != sums[k]] + bad
    if differ:
      raise ValueError(f'The checkpoint at {manager.directory}/{step} is damaged ({len(differ)} '
                       f'arrays differ from their checksums or hold NaNs, e.g. {differ[0]}); '
                       f'choose an earlier step of {steps}.')
  variables = {k: restored[k][BACKBONE] for k in abstract}

  dtype = jax.numpy.dtype(dtype or config.get('dtype', 'float32'))
  module = models.build_backbone(config.model, dtype)
  return PretrainedBackbone(config=config, step=int(step), module=module, variables=variables,
                            workdir=workdir)
