"""Checkpoints: orbax CheckpointManager with the train state, the data position and the config.

Each saved step holds two items written together: 'state' (the whole TrainState, sharded
arrays saved by every process) and 'meta' (JSON: the step, the data seed and the next step
the input pipeline will produce, and the run-defining part of the config). Orbax writes into a
temporary directory and renames it when complete, so a preempted save never leaves a
half-written checkpoint that a restart would pick up.

A rerun of the same command in the same workdir resumes from the latest step. A rerun with a
different model/method/optimizer/batch/data config is refused with the list of differences.
"""

import json
import logging as pylogging
import os

import orbax.checkpoint as ocp
from absl import logging
from etils import epath

# Settings that may change between a run and its resumption: they do not change the
# trajectory (how often to log, evaluate or save, where the data files live).
RESUMABLE_CHANGES = ('log_every_steps', 'checkpoint_every_steps', 'keep_checkpoints', 'eval',
                     'data.data_dir', 'async_checkpointing', 'plot', 'stop_after_steps',
                     # the layout: a run may resume on another mesh (orbax reshards)
                     'mesh', 'sharding_rules', 'fsdp_min_size',
                     # fine-tuning and probe configs name theirs differently
                     'eval_every_epochs', 'eval_batch_size')


def _flatten(d, prefix=''):
  out = {}
  for k, v in d.items():
    key = f'{prefix}{k}'
    if isinstance(v, dict):
      out.update(_flatten(v, key + '.'))
    else:
      out[key] = list(v) if isinstance(v, tuple) else v
  return out


def run_defining(config) -> dict:
  flat = _flatten(json.loads(config.to_json_best_effort()))
  return {k: v for k, v in flat.items()
          if not any(k == c or k.startswith(c + '.') for c in RESUMABLE_CHANGES)}


def config_differences(saved: dict, current: dict) -> list:
  keys = sorted(set(saved) | set(current))
  return [f'  {k}: checkpoint has {saved.get(k, "<unset>")!r}, this run has {current.get(k, "<unset>")!r}'
          for k in keys if saved.get(k) != current.get(k)]


class Checkpointer:
  """Saves every `every_steps` steps (async), keeps the last `keep`, restores the latest."""

  def __init__(self, workdir, config, every_steps: int, keep: int, use_async: bool = True):
    self.directory = epath.Path(workdir) / 'checkpoints'
    if not str(workdir).startswith('gs://'):
      self.directory = epath.Path(os.path.abspath(self.directory))
    self.config = config
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, save_interval_steps=every_steps,
            enable_async_checkpointing=use_async, create=True),
        item_names=('state', 'meta'))

  def latest_step(self):
    return self.manager.latest_step()

  def check_config(self, step):
    """Refuses to resume a run whose run-defining config differs. Call before compiling."""
    meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    diffs = config_differences(meta['config'], run_defining(self.config))
    if diffs:
      raise ValueError(
          f'The checkpoint at {self.directory} (step {step}) was written by a different config:\n'
          + '\n'.join(diffs) + '\nUse a new --workdir for a new run, or revert these overrides '
          'to resume the old one.')
    return meta

  def restore(self, step, abstract_state):
    """Restores the state onto the shardings given by `abstract_state` (ShapeDtypeStructs)."""
    restored = self.manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                      meta=ocp.args.JsonRestore()))
    return restored.state, restored.meta

  def resume(self, abstract_state):
    """(state, step) of the latest checkpoint, config checked first and the data position
    checked against the state's step; (None, 0) when there is none."""
    latest = self.latest_step()
    if latest is None:
      return None, 0
    self.check_config(latest)
    state, meta = self.restore(latest, abstract_state)
    step = int(state.step)
    if meta['data']['next_step'] != step:
      raise ValueError(f'Checkpoint {latest} in {self.directory} is inconsistent: the state is '
                       f'at step {step}, the data position at {meta["data"]}.')
    return state, step

  def save(self, step: int, state, data_position: dict, force: bool = False) -> bool:
    meta = dict(step=int(step), data=data_position, config=run_defining(self.config))
    return self.manager.save(
        step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                      meta=ocp.args.JsonSave(meta)), force=force)

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def quiet_orbax_logging() -> None:
  """Keeps orbax's warnings in the absl log and drops its INFO narration of every save and read.

  Record levels are Python's here (absl's own WARNING constant is -1).
  """
  logging.get_absl_logger().addFilter(
      lambda record: record.levelno >= pylogging.WARNING or 'orbax' not in record.pathname)
