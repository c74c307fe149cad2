"""The loop shared by pretraining, fine-tuning and the probe (loop.Loop), on a toy step: the
finite-check policy, save pacing, preemption, evaluators and the logged rows."""

import functools
import signal

import jax.numpy as jnp
import numpy as np
import pytest

from mocojax import loop, preemption

GROUPS = ('stem', 'block', 'head')


class _Checkpointer:
  directory = '/ckpt'

  def __init__(self):
    self.saved = []

  def save(self, step, state, position, force=False):
    self.position = dict(position)  # what Checkpointer.resume gives back as meta['data']
    position.pop('evaluations_pending', None)
    assert position == dict(seed=0, next_step=step) and force
    self.saved.append((step, float(state)))

  def wait(self):
    pass


class _Watcher:
  def __init__(self, at):
    self.at, self.signum = at, None

  def requested(self, step):
    if step == self.at:
      self.signum = signal.SIGTERM
    return self.signum is not None


class _Evaluator:
  def __init__(self):
    self.seen = []

  def run(self, state):
    self.seen.append(float(state))
    return {'score': float(state)}


def _step(state, batch, bad_step=None, bad_group=1):
  """state + batch; at `bad_step` the gradient of group `bad_group` on is NaN."""
  state = state + batch
  grad_inf = jnp.array([0.1, 0.2, 0.3])
  if bad_step is not None:
    grad_inf = jnp.where((jnp.arange(3) >= bad_group) & (state == bad_step), jnp.nan, grad_inf)
  return state, dict(loss=state * 0.5, grad_inf=grad_inf)


def _loop(tmp_path, watcher=None, resume_step=0, **kw):
  return loop.Loop(
      writer=loop.MetricsWriter(str(tmp_path), resume_step), steps_per_epoch=4,
      examples_per_step=8, log_every=2, checkpointer=_Checkpointer(), checkpoint_every=2,
      watcher=watcher,
      check=functools.partial(loop.check_step, groups=GROUPS, checkpoint_dir='/ckpt',
                              advice='Lower the lr'),
      checked=('loss', 'grad_inf'), vectors={'grad_inf': GROUPS}, **kw)


def _batches():
  while True:
    yield jnp.float32(1.0)


def test_a_non_finite_step_stops_the_run_unsaved_and_is_named(tmp_path):
  lp = _loop(tmp_path)
  with pytest.raises(loop.DivergenceError) as e:
    lp.run(jnp.float32(0.0), functools.partial(_step, bad_step=5), _batches(), start_step=0,
           stop_at=12)
  assert str(e.value).startswith('Step 5 diverged: gradients are non-finite from block on '
                                 '(2 of 3 parameter groups).')
  assert 'Lower the lr; the last good checkpoint is in /ckpt.' in str(e.value)
  # Found one step late (the host checks step t-1 while step t runs), before step 6's save.
  assert [s for s, _ in lp.checkpointer.saved] == [2, 4]


def test_a_non_finite_step_at_a_save_is_not_saved(tmp_path):
  lp = _loop(tmp_path)
  with pytest.raises(loop.DivergenceError, match='Step 4 diverged'):
    lp.run(jnp.float32(0.0), functools.partial(_step, bad_step=4), _batches(), start_step=0,
           stop_at=12)
  assert [s for s, _ in lp.checkpointer.saved] == [2]


def test_rows_saves_and_evaluations(tmp_path):
  lp = _loop(tmp_path)
  evaluator = _Evaluator()
  state, summary = lp.run(jnp.float32(0.0), _step, _batches(), start_step=0, stop_at=7,
                          evaluators=[loop.Every(evaluator, steps=3)])
  assert float(state) == 7 and [s for s, _ in lp.checkpointer.saved] == [2, 4, 6, 7]
  assert evaluator.seen == [3.0, 6.0, 7.0]  # every 3 steps and after the last
  rows = [r for r in loop.metrics_log_lib.read_rows(str(tmp_path / 'metrics.jsonl'))
          if 'loss' in r]
  assert [r['step'] for r in rows] == [2, 4, 6, 7]
  # Interval means; the vector as one scalar per group; the epoch.
  assert rows[0]['loss'] == pytest.approx((0.5 + 1.0) / 2)
  assert rows[0]['grad_inf/head'] == pytest.approx(0.3) and rows[-1]['epoch'] == 7 / 4
  assert summary['score'] == 7.0


def test_preemption_saves_the_step_and_raises(tmp_path):
  lp = _loop(tmp_path, watcher=_Watcher(at=3))
  with pytest.raises(preemption.Preempted, match='SIGTERM: saved step 3 of 10 to /ckpt') as e:
    lp.run(jnp.float32(0.0), _step, _batches(), start_step=0, stop_at=10)
  assert e.value.exit_code == 128 + signal.SIGTERM
  assert lp.checkpointer.saved == [(2, 2.0), (3, 3.0)]


def test_check_step_names_the_heads_whose_loss_is_not_finite():
  with pytest.raises(loop.DivergenceError, match=r'Step 3 diverged: the loss is inf for lr=30'):
    loop.check_step({'loss': np.array([0.5, np.inf])}, 3, groups=('lr=0.3', 'lr=30'),
                    advice='x')
  loop.check_step({'loss': np.array([0.5, 0.7])}, 3, groups=('lr=0.3', 'lr=30'), advice='x')


@pytest.mark.parametrize('preempted_at, pending', [(3, True), (4, False)])
def test_evaluations_due_at_a_preempted_step_run_first_on_resume(tmp_path, preempted_at, pending):
  # Preempted at step 3, where the evaluator is due: the save says so, and the resumed run
  # evaluates step 3's state before its first step. At step 4 nothing was due.
  lp = _loop(tmp_path, watcher=_Watcher(at=preempted_at))
  evaluator = _Evaluator()
  every = [loop.Every(evaluator, steps=3, at_end=False)]
  with pytest.raises(preemption.Preempted):
    lp.run(jnp.float32(0.0), _step, _batches(), start_step=0, stop_at=7, evaluators=every)
  assert evaluator.seen == ([] if preempted_at == 3 else [3.0])
  meta = dict(step=preempted_at, data=lp.checkpointer.position)
  assert loop.evaluations_pending(meta) is pending and not loop.evaluations_pending(None)

  resumed = _loop(tmp_path, resume_step=preempted_at)
  state, summary = resumed.run(jnp.float32(preempted_at), _step, _batches(),
                               start_step=preempted_at, stop_at=7, evaluators=every,
                               evaluations_pending=loop.evaluations_pending(meta))
  assert evaluator.seen == [3.0, 6.0] and float(state) == 7 and summary['score'] == 6.0
  scores = [r['step'] for r in loop.metrics_log_lib.read_rows(str(tmp_path / 'metrics.jsonl'))
            if 'score' in r]
  assert scores == [3, 6]  # each evaluation once
