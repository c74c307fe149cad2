"""Faults a long run meets: preemption, damaged checkpoints, two runs in one workdir, divergence.

The end-to-end test runs `python -m mocojax.main` as a user would and interrupts it with real
signals; the others drive the pieces (Checkpointer, WorkdirLock, MetricsLog, the divergence
check) directly.
"""

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from mocojax import checkpoint as ckpt_lib
from mocojax import loop
from mocojax import metrics_log
from mocojax import parallel
from mocojax import preemption
from mocojax import step as step_lib
from mocojax import train
from mocojax import workdir_lock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FMNIST = '/usr/share/datasets/fashion-mnist'
needs_fmnist = pytest.mark.skipif(not os.path.exists(FMNIST),
                                  reason='needs the dataset-fashion-mnist package')

# The tiny_config fixture's model, as command-line overrides; 100 steps (a few seconds, long
# enough to be interrupted at a chosen step), a save every 10.
TINY = ['--config=configs/demo.py', '--config.model.width=32', '--config.model.depth=2',
        '--config.model.num_heads=2', '--config.head.hidden_dim=64', '--config.head.out_dim=32',
        '--config.batch_size=32', '--config.total_steps=100', '--config.warmup_epochs=0',
        '--config.log_every_steps=1', '--config.checkpoint_every_steps=10',
        '--config.eval.knn_every_epochs=0', '--config.eval.knn_at_end=False',
        '--config.plot=False', '--config.online_probe.enabled=False']


def _start(workdir):
  """The run's output goes to <workdir>.log: a pipe read only at the end would fill and block it."""
  with open(f'{workdir}.log', 'a') as log:
    return subprocess.Popen([sys.executable, '-m', 'mocojax.main', f'--workdir={workdir}', *TINY],
                            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)


def _output(workdir):
  with open(f'{workdir}.log') as f:
    return f.read()


def _rows(workdir):
  try:
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
      return [json.loads(line) for line in f if line.endswith('\n')]
  except FileNotFoundError:
    return []


def _wait_for_step(proc, workdir, step, timeout=300):
  """The last step logged once the run has logged `step` (a row is written after each step)."""
  t0 = time.time()
  while time.time() - t0 < timeout:
    rows = _rows(workdir)
    if rows and rows[-1]['step'] >= step:
      return rows[-1]['step']
    if proc.poll() is not None:
      raise AssertionError(f'the run ended before step {step}:\n{_output(workdir)[-3000:]}')
    time.sleep(0.05)
  raise AssertionError(f'step {step} not reached in {timeout} s')


def _event_steps(workdir, tag):
  import tensorflow as tf
  steps = []
  for path in sorted(tf.io.gfile.glob(os.path.join(workdir, 'events.out.tfevents.*'))):
    for event in tf.compat.v1.train.summary_iterator(path):
      steps += [event.step for v in event.summary.value if v.tag == tag]
  return sorted(steps)


def _final_state(workdir, step=100):
  path = os.path.join(workdir, 'checkpoints', str(step), 'state')
  return [np.asarray(jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
                     else x) for x in jax.tree.leaves(ocp.PyTreeCheckpointer().restore(path))]


@needs_fmnist
def test_kill_term_and_resume_lose_at_most_one_step_and_end_bit_identical(tiny_config, tmp_path):
  reference = _start(tmp_path / 'reference')
  assert reference.wait(timeout=600) == 0, _output(tmp_path / 'reference')[-3000:]

  run = tmp_path / 'run'
  # SIGKILL: nothing can be saved; the restart resumes from the last periodic save (step 10).
  proc = _start(run)
  _wait_for_step(proc, run, 33)
  proc.kill()
  proc.wait()

  proc = _start(run)
  _wait_for_step(proc, run, 34)
  # A second run in the same workdir refuses at once, naming the first one.
  with pytest.raises(workdir_lock.WorkdirBusyError, match=f'process {proc.pid} on this host'):
    train.train_and_evaluate(tiny_config, str(run))
  # SIGTERM: the step in flight is finished and saved; the exit says which.
  seen = _wait_for_step(proc, run, 61)
  proc.send_signal(signal.SIGTERM)
  proc.wait(timeout=300)
  out = _output(run)
  assert proc.returncode == 128 + signal.SIGTERM, out[-3000:]
  saved = max(int(d) for d in os.listdir(run / 'checkpoints') if d.isdigit())
  assert saved >= seen, (saved, seen)  # nothing logged before the signal is lost
  assert f'SIGTERM: saved step {saved} of 100' in out
  assert not (run / 'run.lock').exists()  # released on the way out

  proc = _start(run)
  assert proc.wait(timeout=600) == 0, _output(run)[-3000:]
  # metrics.jsonl holds each step once, with the uninterrupted run's losses.
  steps = [r['step'] for r in _rows(run) if 'loss' in r]
  assert steps == list(range(1, 101))
  assert [r['loss'] for r in _rows(run)] == [r['loss'] for r in _rows(tmp_path / 'reference')]
  # So do the TensorBoard events: the resumed runs cut what the killed ones logged after their
  # checkpoints.
  assert _event_steps(run, 'loss') == list(range(1, 101))
  a, b = _final_state(tmp_path / 'reference'), _final_state(run)
  assert len(a) == len(b) > 10
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)


# ----------------------------------------------------------------------------------------------
# Damaged checkpoints.
# ----------------------------------------------------------------------------------------------
@flax.struct.dataclass
class _State:
  step: jax.Array
  params: dict


def _state(step):
  k = jax.random.key(step)
  return _State(step=jnp.int32(step),
                params={'w': jax.random.normal(k, (64, 96)), 'b': jnp.full((96,), float(step))})


def _abstract():
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _state(0))


def _config(**kw):
  return ml_collections.ConfigDict({'seed': 0, 'lr': 0.1, **kw})


def _saved(workdir, steps=(1, 2, 3)):
  c = ckpt_lib.Checkpointer(workdir, _config(), every_steps=1, keep=5, use_async=False)
  for s in steps:
    c.save(s, _state(s), dict(seed=0, next_step=s), force=True)
  c.close()


def _largest_data_file(step_dir):
  files = [os.path.join(r, f) for r, _, fs in os.walk(step_dir / 'state') for f in fs
           if os.sep + 'd' + os.sep in os.path.join(r, f)]
  return max(files, key=os.path.getsize)


def _flip(path):
  with open(path, 'r+b') as f:
    f.seek(os.path.getsize(path) // 2)
    chunk = f.read(8)
    f.seek(os.path.getsize(path) // 2)
    f.write(bytes(b ^ 0xFF for b in chunk))


DAMAGE = {
    'data file deleted': lambda d: os.remove(_largest_data_file(d)),
    'data file truncated': lambda d: os.truncate(_largest_data_file(d), 40),
    'eight bytes flipped': lambda d: _flip(_largest_data_file(d)),
    'manifest.ocdbt deleted': lambda d: os.remove(d / 'state' / 'manifest.ocdbt'),
    '_METADATA deleted': lambda d: os.remove(d / 'state' / '_METADATA'),
    'meta/metadata deleted': lambda d: os.remove(d / 'meta' / 'metadata'),
    'empty step folder': lambda d: (subprocess.run(['rm', '-rf', str(d)], check=True),
                                    os.mkdir(d)),
}


@pytest.mark.parametrize('damage', list(DAMAGE))
def test_a_damaged_checkpoint_falls_back_to_the_one_before(tmp_path, caplog, damage):
  _saved(tmp_path)
  DAMAGE[damage](tmp_path / 'checkpoints' / '3')
  c = ckpt_lib.Checkpointer(tmp_path, _config(), every_steps=1, keep=5, use_async=False)
  with caplog.at_level(logging.WARNING):
    state, meta = c.resume(_abstract())
  assert meta['step'] == 2 and int(state.step) == 2
  np.testing.assert_array_equal(state.params['w'], _state(2).params['w'])
  assert any('Checkpoint 3' in r.getMessage() and 'not usable' in r.getMessage()
             for r in caplog.records), [r.getMessage() for r in caplog.records]
  # Moved aside, not deleted; the run can save step 3 again.
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['1', '2']
  assert [n.split('.')[0] for n in os.listdir(tmp_path / 'damaged_checkpoints')] == ['3']
  c.save(3, _state(3), dict(seed=0, next_step=3), force=True)
  c.close()
  c = ckpt_lib.Checkpointer(tmp_path, _config(), every_steps=1, keep=5, use_async=False)
  state, meta = c.resume(_abstract())
  assert meta['step'] == 3
  c.close()


def test_flipped_bits_change_the_checksum_and_nans_are_found():
  s = _state(1)
  sums, bad = ckpt_lib.fingerprint(s)
  assert set(sums) == {'step', 'params/b', 'params/w'} and bad == []
  w = np.array(s.params['w'])
  w.view(np.uint32)[17, 5] ^= 1 << 30
  flipped = s.replace(params={**s.params, 'w': jnp.asarray(w)})
  sums2, _ = ckpt_lib.fingerprint(flipped)
  assert sums2['params/w'] != sums['params/w'] and sums2['params/b'] == sums['params/b']
  # Two words swapped keep the plain sum; the position-weighted one catches them.
  w = np.array(s.params['w'])
  w[0, 0], w[0, 1] = w[0, 1], w[0, 0]
  sums3, _ = ckpt_lib.fingerprint(s.replace(params={**s.params, 'w': jnp.asarray(w)}))
  assert sums3['params/w'][0] == sums['params/w'][0] != 0
  assert sums3['params/w'][1] != sums['params/w'][1]
  _, bad = ckpt_lib.fingerprint(s.replace(params={**s.params, 'b': s.params['b'].at[3].set(jnp.nan)}))
  assert bad == ['params/b']


def test_checksums_do_not_depend_on_the_sharding():
  s = _state(4)
  mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(-1), ('x',))
  sharded = jax.device_put(s.params['w'], jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec('x')))
  assert ckpt_lib.fingerprint(s)[0] == ckpt_lib.fingerprint(
      s.replace(params={**s.params, 'w': sharded}))[0]


def test_no_usable_checkpoint_is_one_error_naming_each(tmp_path):
  _saved(tmp_path, steps=(1, 2))
  for s in ('1', '2'):
    os.remove(tmp_path / 'checkpoints' / s / 'state' / '_METADATA')
  c = ckpt_lib.Checkpointer(tmp_path, _config(), every_steps=1, keep=5, use_async=False)
  with pytest.raises(ckpt_lib.CheckpointError, match='step 2: .*; step 1: ') as e:
    c.resume(_abstract())
  assert '\n' not in str(e.value)
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['1', '2']  # nothing moved


def test_another_config_is_refused_not_skipped(tmp_path):
  _saved(tmp_path)
  c = ckpt_lib.Checkpointer(tmp_path, _config(lr=0.2), every_steps=1, keep=5, use_async=False)
  with pytest.raises(ValueError, match='lr: checkpoint has 0.1, this run has 0.2'):
    c.resume(_abstract())
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['1', '2', '3']


# ----------------------------------------------------------------------------------------------
# The workdir lock, the metrics file, the preemption watcher.
# ----------------------------------------------------------------------------------------------
def _write_lock(workdir, **holder):
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, 'run.lock'), 'w') as f:
    json.dump(holder, f)


def test_workdir_lock_refuses_a_live_holder_and_takes_over_a_dead_one(tmp_path):
  sleeper = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])
  try:
    host = socket.gethostname()
    _write_lock(tmp_path, host=host, pid=sleeper.pid, started=time.time(), heartbeat=time.time())
    with pytest.raises(workdir_lock.WorkdirBusyError, match=f'process {sleeper.pid} on this host'):
      with workdir_lock.WorkdirLock(tmp_path):
        pass
  finally:
    sleeper.kill()
    sleeper.wait()
  with workdir_lock.WorkdirLock(tmp_path):  # its pid is gone: stale
    assert json.loads((tmp_path / 'run.lock').read_text())['pid'] == os.getpid()
  assert not (tmp_path / 'run.lock').exists()

  # Another host: alive while its heartbeat is fresh, stale after STALE_S.
  _write_lock(tmp_path, host='elsewhere', pid=1, started=time.time(), heartbeat=time.time())
  with pytest.raises(workdir_lock.WorkdirBusyError, match='on host elsewhere'):
    with workdir_lock.WorkdirLock(tmp_path):
      pass
  _write_lock(tmp_path, host='elsewhere', pid=1, started=0,
              heartbeat=time.time() - workdir_lock.STALE_S - 1)
  with workdir_lock.WorkdirLock(tmp_path):
    pass


def test_workdir_lock_heartbeat_refreshes_the_file(tmp_path):
  with workdir_lock.WorkdirLock(tmp_path, heartbeat_s=0.05):
    first = json.loads((tmp_path / 'run.lock').read_text())['heartbeat']
    time.sleep(0.3)
    assert json.loads((tmp_path / 'run.lock').read_text())['heartbeat'] > first


def test_metrics_log_keeps_each_step_once_after_a_resume(tmp_path):
  path = str(tmp_path / 'metrics.jsonl')
  log = metrics_log.MetricsLog(path)
  for s in range(1, 8):
    log.write(s, {'loss': s})
  with open(path, 'a') as f:
    f.write('{"step": 8, "lo')  # cut short by a kill
  log = metrics_log.MetricsLog(path, resume_step=5)
  for s in range(6, 9):
    log.write(s, {'loss': 10 * s})
  with open(path) as f:
    rows = [json.loads(line) for line in f]
  assert [r['step'] for r in rows] == list(range(1, 9))
  assert [r['loss'] for r in rows] == [1, 2, 3, 4, 5, 60, 70, 80]


def test_metrics_writer_keeps_each_step_once_in_tensorboard_too(tmp_path):
  import tensorflow as tf
  writer = loop.MetricsWriter(str(tmp_path))
  for s in range(1, 8):
    writer.write(s, {'loss': s})
  writer.close()
  [path] = tf.io.gfile.glob(str(tmp_path / 'events.out.tfevents.*'))
  with open(path, 'ab') as f:
    f.write(b'\x20\x00\x00')  # a record cut short by a kill
  writer = loop.MetricsWriter(str(tmp_path), resume_step=5)
  for s in range(6, 9):
    writer.write(s, {'loss': 10 * s})
  writer.close()
  assert _event_steps(tmp_path, 'loss') == list(range(1, 9))
  values = {}
  for p in tf.io.gfile.glob(str(tmp_path / 'events.out.tfevents.*')):
    for event in tf.compat.v1.train.summary_iterator(p):
      values.update({event.step: float(tf.make_ndarray(v.tensor)) for v in event.summary.value})
  assert [values[s] for s in range(1, 9)] == [1, 2, 3, 4, 5, 60, 70, 80]
  assert [r['step'] for r in metrics_log.read_rows(str(tmp_path / 'metrics.jsonl'))] == list(
      range(1, 9))


def test_watcher_turns_sigterm_into_a_request_and_restores_the_handler():
  before = signal.getsignal(signal.SIGTERM)
  with preemption.Watcher() as w:
    assert not w.requested(1)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.01)  # the handler runs between bytecodes of the main thread
    assert w.requested(2) and w.signum == signal.SIGTERM
  assert signal.getsignal(signal.SIGTERM) is before


# ----------------------------------------------------------------------------------------------
# Divergence.
# ----------------------------------------------------------------------------------------------
GROUPS = ('backbone/patch_embed', 'backbone/blocks_0', 'backbone/blocks_1', 'projector')
GUARD = loop.Guard(max_update_ratio=1.0, max_param_norm_growth=10.0, start_param_norm=25.0)


def _check(**values):
  v = dict(loss=1.0, param_norm=30.0, update_norm=0.01, grad_inf=np.array([0.0, 1.0, 2.0, 0.5]))
  v.update(values)
  loop.check_step(v, 7, groups=GROUPS, guard=GUARD, checkpoint_dir='/w/checkpoints',
                  advice='Lower optimizer.base_lr')


def test_divergence_check_names_the_step_and_the_first_bad_layer():
  _check()  # healthy
  with pytest.raises(loop.DivergenceError, match=r'Step 7 diverged: the loss is nan'):
    _check(loss=float('nan'))
  with pytest.raises(loop.DivergenceError,
                     match=r'non-finite from backbone/blocks_1 on \(2 of 4 parameter groups\)'):
    _check(grad_inf=np.array([0.0, 1.0, np.inf, np.nan]))
  with pytest.raises(loop.DivergenceError, match=r'update norm 40 exceeds .*max_update_ratio=1'):
    _check(update_norm=40.0)
  with pytest.raises(loop.DivergenceError, match=r'largest gradient is in backbone/blocks_1'):
    _check(param_norm=300.0)  # 12x the start
  with pytest.raises(loop.DivergenceError, match='/w/checkpoints') as e:
    _check(loss=float('inf'))
  assert '\n' not in str(e.value)
  _check(param_norm=240.0)  # 9.6x: within the bound


@needs_fmnist
def test_a_diverging_run_stops_before_saving(tiny_config, tmp_path):
  c = tiny_config
  # The lr warms up to 1.0 over 20 steps: a few steps in, one update outgrows the parameters,
  # while the asynchronous save of the step before is still being written.
  c.total_steps, c.optimizer.base_lr = 30, 8.0
  c.warmup_epochs = 20 / (60_000 // c.batch_size)
  c.checkpoint_every_steps, c.eval.knn_at_end, c.online_probe.enabled = 1, False, False
  with pytest.raises(loop.DivergenceError,
                     match=r'Step \d+ diverged: the (update|parameter) norm') as e:
    train.train_and_evaluate(c, str(tmp_path))
  diverged = int(str(e.value).split()[1])
  assert diverged >= 2
  saved = sorted(int(d) for d in os.listdir(tmp_path / 'checkpoints') if d.isdigit())
  assert saved and max(saved) < diverged  # the saves before it finished; none of it
  assert not (tmp_path / 'run.lock').exists()
  c = ckpt_lib.Checkpointer(tmp_path, c, every_steps=1, keep=3)
  state, meta = c.resume(step_lib.setup(
      tiny_config, parallel.make_mesh(), 10, 1).abstract_state)
  assert meta['step'] == max(saved) == int(state.step)
  c.close()


def test_per_layer_gradient_norms_equal_a_direct_computation(tiny_config):
  from mocojax import models
  from mocojax import momentum as momentum_lib
  c = tiny_config
  method, step_fn, init_fn, _ = step_lib.build(c, steps_per_epoch=10, channels=1)
  groups = step_fn.keywords['layer_groups']
  state = jax.jit(init_fn)(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
  batch = {f'view{v}': jax.random.normal(jax.random.key(v), (32, 28, 28, 1)) for v in (1, 2)}
  _, metrics = jax.jit(step_fn)(state, batch)

  # The gradient the step takes, written out, and each group's max |g| by its parameter names.
  m = step_fn.keywords['momentum_schedule'](state.step)
  momentum_params = momentum_lib.ema_update(state.momentum_params, state.params, m)
  rng = jax.random.fold_in(state.rng, state.step)
  grads = jax.grad(lambda p: method.loss(p, state, momentum_params, batch, rng)[0])(state.params)
  flat = {'/'.join(str(k.key) for k in path): np.abs(np.asarray(g)).max()
          for path, g in jax.tree_util.tree_leaves_with_path(grads)}
  assert groups == tuple(models.layer_groups(state.params))
  assert groups[:3] == ('backbone/patch_embed', 'backbone/cls_token', 'backbone/blocks_0')
  assert groups[-3:] == ('backbone/norm', 'projector', 'predictor')
  covered = set()
  for g, got in zip(groups, np.asarray(metrics['grad_inf'])):
    names = [n for n in flat if n == g or n.startswith(g + '/')]
    covered.update(names)
    np.testing.assert_allclose(got, max(flat[n] for n in names), rtol=1e-6)
  assert covered == set(flat)  # every parameter in exactly one group (blocks_1 is not blocks_10)
  assert float(metrics['grad_inf'][0]) == 0.0  # the frozen patch projection
