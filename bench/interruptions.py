r"""Interrupts a tiny pretraining run N times with SIGKILL or SIGTERM and checks what was lost.

  python bench/interruptions.py --n=20

Runs `python -m mocojax.main` on Fashion-MNIST with a 2-block ViT: once without interruption
(the reference), then again in another workdir, killed N times at random steps with a random
choice of SIGKILL (nothing can be saved: the restart falls back to the last periodic save) or
SIGTERM (the trainer finishes its step, saves it and exits 143), restarted after each, and
finally run to the end. Prints, per interruption, the signal, the last step logged before it,
the step the restart resumed from and the steps lost; then whether metrics.jsonl holds each
step once with the reference's losses and whether the final state is bit-identical. Each signal
is sent once the restarted run has logged a step of its own, i.e. during training (a signal
during start-up, before any step, has nothing to lose).
"""

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

# The runs save arrays laid out on 8 CPU devices; this process reads them back on the same.
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
import jax  # noqa: E402
import numpy as np  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def overrides(steps: int, every: int) -> list:
  return ['--config=configs/demo.py', '--config.model.width=32', '--config.model.depth=2',
          '--config.model.num_heads=2', '--config.head.hidden_dim=64', '--config.head.out_dim=32',
          '--config.batch_size=32', f'--config.total_steps={steps}', '--config.warmup_epochs=0',
          '--config.log_every_steps=1', f'--config.checkpoint_every_steps={every}',
          '--config.eval.knn_every_epochs=0', '--config.eval.knn_at_end=False',
          '--config.plot=False', '--config.online_probe.enabled=False']


def start(workdir, args):
  """Starts a run whose output goes to <workdir>.log (a pipe nobody reads would fill and block
  the run)."""
  env = dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='2',
             XLA_FLAGS='--xla_force_host_platform_device_count=8')
  with open(f'{workdir}.log', 'a') as log:
    return subprocess.Popen([sys.executable, '-m', 'mocojax.main', f'--workdir={workdir}', *args],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def tail(workdir) -> str:
  with open(f'{workdir}.log') as f:
    return f.read()[-3000:]


def rows(workdir):
  try:
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
      return [json.loads(line) for line in f if line.endswith('\n')]
  except FileNotFoundError:
    return []


def last_logged(workdir) -> int:
  r = rows(workdir)
  return r[-1]['step'] if r else 0


def saved_steps(workdir) -> list:
  d = os.path.join(workdir, 'checkpoints')
  return sorted(int(s) for s in os.listdir(d) if s.isdigit()) if os.path.isdir(d) else []


def final_state(workdir, step):
  tree = ocp.PyTreeCheckpointer().restore(os.path.join(workdir, 'checkpoints', str(step), 'state'))
  return [np.asarray(jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
                     else x) for x in jax.tree.leaves(tree)]


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--n', type=int, default=20, help='interruptions')
  parser.add_argument('--steps', type=int, default=300, help='steps of the run')
  parser.add_argument('--every', type=int, default=10, help='checkpoint_every_steps')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--workdir', default='/tmp/mocojax_interruptions')
  a = parser.parse_args()
  rng = random.Random(a.seed)
  args = overrides(a.steps, a.every)
  shutil.rmtree(a.workdir, ignore_errors=True)
  os.makedirs(a.workdir)
  reference, run = os.path.join(a.workdir, 'reference'), os.path.join(a.workdir, 'run')

  t0 = time.time()
  p = start(reference, args)
  if p.wait() != 0:
    sys.exit(f'The reference run failed:\n{tail(reference)}')
  print(f'reference: {a.steps} steps in {time.time() - t0:.0f} s', flush=True)

  # logged: the last step in metrics.jsonl when the signal was sent; saved: the latest
  # checkpoint after the exit, where the restart resumes.
  print(f'{"#":>3} {"signal":8} {"logged":>6} {"exit":>5} {"saved":>6} {"lost":>5}')
  lost = {'SIGKILL': [], 'SIGTERM': []}
  for i in range(a.n):
    resume = saved_steps(run)[-1] if saved_steps(run) else 0
    # Past every row already in metrics.jsonl (a SIGKILLed run leaves rows after its last
    # save until the restart drops them): a row at `target` is then this run's own.
    target = min(a.steps - 1, max(resume, last_logged(run)) + rng.randint(3, 2 * a.every))
    sig = rng.choice([signal.SIGKILL, signal.SIGTERM])
    p = start(run, args)
    while last_logged(run) < target and p.poll() is None:
      time.sleep(0.02)
    if p.poll() is not None:
      sys.exit(f'The run ended before step {target}:\n{tail(run)}')
    p.send_signal(sig)
    logged = last_logged(run)
    code = p.wait()
    saved = saved_steps(run)[-1] if saved_steps(run) else 0
    n_lost = max(0, logged - saved)  # steps done before the signal that a restart redoes
    lost[sig.name].append(n_lost)
    print(f'{i + 1:>3} {sig.name:8} {logged:>6} {code:>5} {saved:>6} {n_lost:>5}',
          flush=True)

  p = start(run, args)
  if p.wait() != 0:
    sys.exit(f'The last restart failed:\n{tail(run)}')
  steps = [r['step'] for r in rows(run) if 'loss' in r]
  same_losses = ([r['loss'] for r in rows(run)] == [r['loss'] for r in rows(reference)])
  a_state, b_state = final_state(reference, a.steps), final_state(run, a.steps)
  identical = len(a_state) == len(b_state) and all(
      np.array_equal(x, y) for x, y in zip(a_state, b_state))
  for name, values in lost.items():
    if values:
      print(f'{name}: {len(values)} interruptions, steps lost: max {max(values)}, '
            f'mean {np.mean(values):.1f}, total {sum(values)}')
  print(f'metrics.jsonl: {len(steps)} rows, each step once: {steps == list(range(1, a.steps + 1))}, '
        f"losses equal to the reference's: {same_losses}")
  print(f'final state bit-identical to the reference: {identical} ({len(a_state)} leaves); '
        f'total time {time.time() - t0:.0f} s')


if __name__ == '__main__':
  main()
