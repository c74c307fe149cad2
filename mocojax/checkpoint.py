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
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from absl import logging
from etils import epath

from mocojax import parallel

# Settings that may change between a run and its resumption: they do not change the
# trajectory (how often to log, evaluate or save, where the data files live).
RESUMABLE_CHANGES = ('log_every_steps', 'checkpoint_every_steps', 'keep_checkpoints', 'eval',
                     'data.data_dir', 'async_checkpointing', 'plot', 'stop_after_steps',
                     'divergence',  # loosened to carry a run on past a false alarm
                     'stability',   # alarm thresholds only read the metrics
                     # the layout: a run may resume on another mesh (orbax reshards)
                     'mesh', 'sharding_rules', 'fsdp_min_size',
                     # how the step is computed, not what: same maths, other speed/memory
                     'model.remat', 'model.attention', 'model.softmax_residual',
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


def _words(x):
  """The array's bits as uint32 words (keys as their key data; 8/16-bit types widened)."""
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  x = jnp.ravel(x)
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  return jax.lax.bitcast_convert_type(x, jnp.dtype(f'uint{8 * x.dtype.itemsize}')).astype(
      jnp.uint32)


def _leaf_check(x):
  """[sum of words, position-weighted sum of words] mod 2**32, and whether x is finite.

  Integer sums wrap exactly and do not depend on the order of the reduction, so the same
  values come back whatever the mesh or sharding a state is restored onto. Any one changed
  word changes the first sum; the weights (1..65521, Fletcher-like) catch moved words.
  """
  w = _words(x)
  weights = jnp.arange(w.size, dtype=jnp.uint32) % 65521 + 1
  sums = jnp.stack([jnp.sum(w, dtype=jnp.uint32), jnp.sum(w * weights, dtype=jnp.uint32)])
  finite = (jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact)
            else jnp.bool_(True))
  return sums, finite


@jax.jit
def _check_state(state):
  checks = [_leaf_check(x) for x in jax.tree.leaves(state)]
  return [c[0] for c in checks], [c[1] for c in checks]


def fingerprint(state) -> tuple:
  """({leaf path: [two uint32 checksums]}, [paths of leaves holding NaN or inf])."""
  all_sums, all_finite = jax.device_get(_check_state(state))
  paths = [p for p, _ in jax.tree_util.tree_flatten_with_path(state)[0]]
  sums, bad = {}, []
  for path, s, finite in zip(paths, all_sums, all_finite):
    name = parallel.path_name(path)
    sums[name] = [int(v) for v in s]
    if not finite:
      bad.append(name)
  return sums, bad


class CheckpointError(RuntimeError):
  """No checkpoint in the directory is usable."""


class Checkpointer:
  """Saves every `every_steps` steps (async), keeps the last `keep`, resumes from the latest
  usable one.

  Each save carries a checksum of every leaf in its meta item (written atomically with the
  state). `resume` verifies it, so that a checkpoint damaged on disk (a missing or truncated
  file, flipped bytes) is moved aside with a warning and the one before it is used; NaNs and a
  data position that disagrees with the state count as damage too. A config that differs
  from the checkpoint's is not damage: it is refused.
  """

  def __init__(self, workdir, config, every_steps: int, keep: int, use_async: bool = True):
    self.workdir = epath.Path(workdir)
    if not str(workdir).startswith('gs://'):
      self.workdir = epath.Path(os.path.abspath(workdir))
    self.directory = self.workdir / 'checkpoints'
    self.config = config
    self._options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, save_interval_steps=every_steps,
        enable_async_checkpointing=use_async, create=True)
    self.manager = self._open()

  def _open(self):
    return ocp.CheckpointManager(self.directory, options=self._options,
                                 item_names=('state', 'meta'))

  def latest_step(self):
    return self.manager.latest_step()

  def check_config(self, meta, step):
    """Refuses to resume a run whose run-defining config differs."""
    diffs = config_differences(meta['config'], run_defining(self.config))
    if diffs:
      raise ValueError(
          f'The checkpoint at {self.directory} (step {step}) was written by a different config:\n'
          + '\n'.join(diffs) + '\nUse a new --workdir for a new run, or revert these overrides '
          'to resume the old one.')

  def read_meta(self, step) -> dict:
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

  def _try_restore(self, step, abstract_state):
    """(state, meta, None) if checkpoint `step` is sound, else (None, meta or None, why)."""
    try:
      meta = self.read_meta(step)
    except Exception as e:  # orbax raises many kinds for missing or unreadable files
      return None, None, f'its meta item does not read ({_first_line(e)})'
    self.check_config(meta, step)  # a config mismatch is an error, not damage
    try:
      state = self.manager.restore(
          step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))).state
    except Exception as e:
      return None, meta, f'its state does not restore ({_first_line(e)})'
    sums, bad = fingerprint(state)
    saved = meta.get('checksums')
    if saved is None:
      logging.warning('Checkpoint %d in %s has no checksums (written by an older mocojax); its '
                      'bytes cannot be verified.', step, self.directory)
    else:
      differ = [k for k in saved if sums.get(k) != saved[k]]
      missing = sorted(set(sums) ^ set(saved))
      if missing:
        return None, meta, f'its leaves differ from the state\'s ({", ".join(missing[:3])})'
      if differ:
        return None, meta, (f'checksum mismatch in {len(differ)} leaves ({", ".join(differ[:3])})'
                            ': its bytes changed after the save')
    if bad:
      return None, meta, f'non-finite values in {", ".join(bad[:3])}'
    if meta['data']['next_step'] != int(state.step):
      return None, meta, (f'the state is at step {int(state.step)} but the data position at '
                          f'{meta["data"]}')
    return state, meta, None

  def resume(self, abstract_state):
    """(state, meta) of the latest usable checkpoint, restored onto the shardings of
    `abstract_state` (ShapeDtypeStructs); (None, None) when the directory holds none.
    meta['step'] is the step, meta['run'] what the caller saved with it.

    Damaged checkpoints newer than the one used are moved to <workdir>/damaged_checkpoints/
    (so that this run can save those steps again), each named in a warning. If none is usable,
    raises CheckpointError listing them and moves nothing.
    """
    steps = sorted(self.manager.all_steps(), reverse=True)
    skipped = []
    for step in steps:
      state, meta, why = self._try_restore(step, abstract_state)
      # Every process must settle on the same step: one whose files it cannot read makes
      # all of them skip it.
      if _anywhere(why is not None):
        why = why or 'another process could not restore it'
        logging.warning('Checkpoint %d in %s is not usable: %s.', step, self.directory, why)
        skipped.append((step, why))
        continue
      if skipped:
        self._move_aside([s for s, _ in skipped])
        logging.warning('Resumed from step %d; damaged checkpoints %s were moved to %s.', step,
                        [s for s, _ in skipped], self.workdir / 'damaged_checkpoints')
      return state, meta
    if skipped:
      raise CheckpointError(
          f'No usable checkpoint in {self.directory}: '
          + '; '.join(f'step {s}: {why}' for s, why in skipped)
          + '. Move the directory aside to start the run afresh.')
    return None, None

  def _move_aside(self, steps):
    self.manager.close()
    if jax.process_index() == 0:
      aside = self.workdir / 'damaged_checkpoints'
      aside.mkdir(parents=True, exist_ok=True)
      for step in steps:
        target = aside / f'{step}.{int(time.time())}'
        (self.directory / str(step)).rename(target)
    _barrier('mocojax_move_damaged_checkpoints')
    self.manager = self._open()

  def save(self, step: int, state, data_position: dict, force: bool = False,
           run: dict | None = None) -> bool:
    """Starts saving `state` (async unless disabled); `run` is small JSON to keep with it."""
    sums, bad = fingerprint(state)
    if bad:
      raise FloatingPointError(
          f'Not saving step {step}: non-finite values in {", ".join(bad[:3])}.')
    meta = dict(step=int(step), data=data_position, config=run_defining(self.config),
                checksums=sums, run=run or {})
    return self.manager.save(
        step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                      meta=ocp.args.JsonSave(meta)), force=force)

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def _first_line(e: BaseException) -> str:
  text = str(e).strip().splitlines()
  return f'{type(e).__name__}: {text[0][:200]}' if text else type(e).__name__


def _anywhere(flag: bool) -> bool:
  """True on every process if `flag` is True on any."""
  if jax.process_count() == 1:
    return flag
  return bool(np.any(multihost_utils.process_allgather(np.array([flag]))))


def _barrier(name: str):
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def quiet_orbax_logging() -> None:
  """Keeps orbax's warnings in the absl log and drops its INFO narration of every save and read.

  Record levels are Python's here (absl's own WARNING constant is -1).
  """
  logging.get_absl_logger().addFilter(
      lambda record: record.levelno >= pylogging.WARNING or 'orbax' not in record.pathname)
