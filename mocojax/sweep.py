r"""A grid of pretraining runs, one after another, and their kNN curves side by side.

  python -m mocojax.sweep --config=configs/stability_fmnist.py --workdir=runs/stability \
      --grid='optimizer.base_lr=1e-4,5e-4,2e-3' --grid='model.stop_grad_patch_embed=True,False' \
      --config.seed=1

Every combination of the --grid values (the cartesian product, in the order given) is one run
of `python -m mocojax.main` in its own subprocess and its own workdir under --workdir, named by
its grid values (`optimizer.base_lr=0.0005,model.stop_grad_patch_embed=True`); --config.<key>
overrides apply to every run. Values are read as Python literals are (int, float, True/False,
None), anything else as a string; each run's main.py parses them by the config field's type.

A run that crashes or diverges does not stop the sweep: its status goes in the table and the
next run starts. Finished runs (exit 0) and diverged ones (which would diverge again) get a
`sweep_done.json` marker and are skipped by a rerun of the same command; any other run is run
again, and main.py resumes it from its latest checkpoint. SIGTERM/SIGINT are passed to the run
in progress, which saves and stops; the sweep then stops too (rerun it to continue).

After every run, and at the end, the sweep writes PARENT/sweep.png (the runs' kNN curves, one
line each, dips circled) and PARENT/sweep.md (final and best kNN, kNN dips and gradient spikes
of the instability alarm, status), and prints the table at the end. Each run's output goes to
<run>/train.log.
"""

import ctypes
import dataclasses
import fcntl
import importlib.util
import itertools
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import time

from absl import app, flags


def _define_flags():
  """Defined when run as a command, not on import: the other commands (knn, linear, ...) take
  --workdir too, and tests import several of them into one process."""
  global _CONFIG, _WORKDIR, _GRID, _DRY_RUN
  _CONFIG = flags.DEFINE_string('config', None, 'Config file of every run (as main.py takes it).',
                                required=True)
  _WORKDIR = flags.DEFINE_string('workdir', None, 'Parent directory: one workdir per run.',
                                 required=True)
  _GRID = flags.DEFINE_multi_string('grid', [], "'key=v1,v2,...': one axis of the grid (repeat).")
  _DRY_RUN = flags.DEFINE_bool('dry_run', False,
                               'Print each run, its status and command; run none.')

MARKER = 'sweep_done.json'
_OVERRIDE = re.compile(r'--?(no)?config\.(.+)')
_DIVERGED = re.compile(r'Step (\d+) diverged')


# ----------------------------------------------------------------------------------------------
# The grid.
# ----------------------------------------------------------------------------------------------
def parse_value(text: str):
  """A command-line value as ml_collections reads one: int, float, bool, None, else str."""
  for kind in (int, float):
    try:
      return kind(text)
    except ValueError:
      pass
  return {'true': True, 'false': False, 'none': None}.get(text.lower(), text)


def format_value(value) -> str:
  """A value as it appears in a run's name: 5e-4 and 0.0005 name the same run."""
  if isinstance(value, float):
    return repr(value)
  return str(value).replace(os.sep, '_')


@dataclasses.dataclass(frozen=True)
class Run:
  grid: tuple  # ((key, text), ...): this run's value of each grid axis, in --grid order

  @property
  def name(self) -> str:
    return ','.join(f'{k}={format_value(parse_value(v))}' for k, v in self.grid) or 'base'

  def args(self, config: str, overrides) -> list:
    """main.py's flags for this run, less --workdir."""
    return [f'--config={config}', *overrides, *(f'--config.{k}={v}' for k, v in self.grid)]


def parse_grid(specs) -> list:
  """['a=1,2', 'b=x,y'] -> [('a', ['1', '2']), ('b', ['x', 'y'])], checked."""
  axes = []
  for spec in specs:
    key, sep, values = spec.partition('=')
    key = key.strip().removeprefix('config.')
    values = [v.strip() for v in values.split(',')]
    if not sep or not key or not all(values):
      raise ValueError(f"--grid={spec!r}: expected 'key=value1,value2,...'.")
    if key in [k for k, _ in axes]:
      raise ValueError(f'--grid names {key} twice; give all its values in one --grid.')
    axes.append((key, values))
  return axes


def plan(axes) -> list:
  """One Run per combination of the axes' values, the first axis varying slowest."""
  runs = [Run(tuple(zip([k for k, _ in axes], combo)))
          for combo in itertools.product(*[values for _, values in axes])]
  names = [r.name for r in runs]
  duplicate = next((n for n in names if names.count(n) > 1), None)
  if duplicate:
    raise ValueError(f'Two grid points are the same run ({duplicate}): a value repeats.')
  return runs


def check_keys(config_file: str, keys) -> list:
  """One line per key the config does not have (with a did-you-mean), as main.py gives them."""
  from mocojax import validate
  path, *args = config_file.split(':', 1)
  spec = importlib.util.spec_from_file_location('_swept_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(*args)
  return [line for line in (validate.unknown_key(config, k) for k in keys) if line]


# ----------------------------------------------------------------------------------------------
# Running.
# ----------------------------------------------------------------------------------------------
def read_marker(run_dir: str):
  try:
    with open(os.path.join(run_dir, MARKER)) as f:
      return json.load(f)
  except (FileNotFoundError, ValueError):
    return None


def _write_marker(run_dir: str, marker: dict):
  tmp = os.path.join(run_dir, MARKER + '.tmp')
  with open(tmp, 'w') as f:
    json.dump(marker, f, indent=2)
  os.replace(tmp, os.path.join(run_dir, MARKER))


def _die_with_parent():
  """In the child, before exec: SIGTERM when the sweep dies (even by SIGKILL), so a killed
  sweep leaves no orphan training on and holding its workdir; the run saves and stops."""
  _LIBC.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


try:
  _LIBC = ctypes.CDLL('libc.so.6', use_errno=True) if sys.platform == 'linux' else None
except OSError:
  _LIBC = None


class _Signals:
  """SIGTERM/SIGINT: remembered, and passed on to the run in progress (in its own session, so
  that a terminal's Ctrl-C reaches it once, through here)."""

  def __init__(self):
    self.signum, self.child = None, None

  def __enter__(self):
    self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}
    return self

  def __exit__(self, *exc):
    for s, handler in self._previous.items():
      signal.signal(s, handler)

  def _handle(self, signum, frame):
    del frame
    self.signum = self.signum or signum
    if self.child is not None and self.child.poll() is None:
      os.kill(self.child.pid, signum)  # a second Ctrl-C stops the run at once, as main.py does


def classify(returncode: int, output: str, stopped: bool) -> dict:
  """The outcome of one attempt at a run, from its exit status and output."""
  if returncode == 0:
    return dict(status='done')
  diverged = _DIVERGED.search(output)
  if diverged:
    message = next(line for line in output.splitlines() if _DIVERGED.search(line))
    return dict(status='diverged', step=int(diverged.group(1)), message=message.strip())
  if stopped:
    return dict(status='stopped')
  lines = [line.strip() for line in output.splitlines() if line.strip()]
  return dict(status='failed', returncode=returncode, message=lines[-1] if lines else '')


def run_one(run_dir: str, args: list, signals: _Signals) -> dict:
  """Runs main.py for one run to its end (or a stop); returns classify's outcome."""
  os.makedirs(run_dir, exist_ok=True)
  cmd = [sys.executable, '-m', 'mocojax.main', *args, f'--workdir={run_dir}']
  log_path = os.path.join(run_dir, 'train.log')
  t0 = time.time()
  with open(log_path, 'a') as log:
    log.write(f'# {time.strftime("%Y-%m-%d %H:%M:%S")} {shlex.join(cmd)}\n')
    log.flush()
    start = log.tell()
    signals.child = subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        start_new_session=True, preexec_fn=_die_with_parent if _LIBC else None)
    try:
      returncode = signals.child.wait()
    finally:
      signals.child = None
  with open(log_path) as f:
    f.seek(start)
    output = f.read()
  return dict(classify(returncode, output, signals.signum is not None),
              seconds=round(time.time() - t0, 1))


# ----------------------------------------------------------------------------------------------
# The table and the figure.
# ----------------------------------------------------------------------------------------------
def summarize(run_dir: str, outcome: dict | None = None) -> dict:
  """A run's kNN curve, alarm counts and status, from its workdir (and this sweep's outcome)."""
  from mocojax import metrics_log, report
  rows = metrics_log.read_rows(os.path.join(run_dir, 'metrics.jsonl'))
  alarm = report.alarm_of(run_dir, rows)
  key = alarm.knn_key
  by_step = {r['step']: (r.get('epoch', math.nan), r[key]) for r in rows if key and key in r}
  curve = [by_step[s] for s in sorted(by_step)]  # (epoch, accuracy) by step
  last_step = max((r['step'] for r in rows if 'loss' in r), default=0)
  marker = read_marker(run_dir) or {}
  outcome = marker or outcome or {}
  status = outcome.get('status')
  if status == 'diverged':
    status = f'diverged at step {outcome["step"]}'
  elif status == 'failed':
    status = f'failed (exit {outcome["returncode"]}): {outcome["message"][:120]}'
  elif status != 'done':
    status = f'stopped at step {last_step}' if last_step else 'not started'
  spikes = [e for e in alarm.events if e.kind == 'spike']
  return dict(knn_key=key, curve=curve, epochs={s: e for s, (e, _) in by_step.items()},
              final=curve[-1][1] if curve else None,
              best=max(a for _, a in curve) if curve else None,
              dips=[e for e in alarm.events if e.kind == 'dip'], spikes=len(spikes),
              reached=sum(e.lag is not None for e in spikes), status=status,
              minutes=outcome.get('seconds', math.nan) / 60)


def table(runs, summaries) -> list:
  """Markdown lines: one row per run."""
  key = next((s['knn_key'] for s in summaries if s['knn_key']), 'knn/top1@k')
  k = key.removeprefix('knn/top1@')

  def pct(v):
    return '' if v is None else f'{100 * v:.1f}'

  lines = [f'| run | final kNN top-1@{k} | best kNN top-1@{k} | kNN dips | gradient spikes '
           '(reached last block) | minutes | status |', '|---|---:|---:|---:|---:|---:|---|']
  for run, s in zip(runs, summaries):
    minutes = '' if math.isnan(s['minutes']) else f'{s["minutes"]:.1f}'
    lines.append(f'| {run.name} | {pct(s["final"])} | {pct(s["best"])} | {len(s["dips"])} | '
                 f'{s["spikes"]} ({s["reached"]}) | {minutes} | {s["status"]} |')
  return lines


def write_figure(path: str, runs, summaries):
  """kNN top-1 against epoch, one line per run: colour by the first grid axis, line style by
  the others; dips circled, a diverged run's end crossed."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  firsts = list(dict.fromkeys(r.grid[0][1] for r in runs if r.grid))
  rests = list(dict.fromkeys(r.grid[1:] for r in runs))
  styles = ['-', '--', ':', '-.']
  fig, ax = plt.subplots(figsize=(9, 6))
  for i, (run, s) in enumerate(zip(runs, summaries)):
    if not s['curve']:
      continue
    color = f'C{firsts.index(run.grid[0][1]) % 10}' if run.grid else f'C{i % 10}'
    epochs, accs = zip(*s['curve'])
    ax.plot(epochs, [100 * a for a in accs], color=color, marker='.',
            ls=styles[rests.index(run.grid[1:]) % len(styles)], label=run.name)
    if s['dips']:
      ax.scatter([s['epochs'][d.step] for d in s['dips']], [100 * d.accuracy for d in s['dips']],
                 s=100, facecolors='none', edgecolors=color, linewidths=1.5)
    if s['status'].startswith('diverged'):
      ax.plot([epochs[-1]], [100 * accs[-1]], marker='x', ms=12, mew=2, color=color)
  key = next((s['knn_key'] for s in summaries if s['knn_key']), 'knn/top1@k')
  ax.set(xlabel='epoch', ylabel=f'{key} (%)',
         title=f'kNN top-1 of {len(runs)} runs (circles: dips; x: diverged)')
  ax.grid(alpha=0.3)
  if any(s['curve'] for s in summaries):
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def write_summary(parent: str, runs, outcomes: dict, command: str) -> list:
  summaries = [summarize(os.path.join(parent, r.name), outcomes.get(r.name)) for r in runs]
  lines = table(runs, summaries)
  write_figure(os.path.join(parent, 'sweep.png'), runs, summaries)
  with open(os.path.join(parent, 'sweep.md.tmp'), 'w') as f:
    f.write(f'# Sweep\n\n```\n{command}\n```\n\n![kNN curves](sweep.png)\n\n')
    f.write('\n'.join(lines) + '\n\nDips and spikes: the instability alarm (mocojax/stability.py) '
            "with each run's config.stability thresholds, recomputed from its metrics.jsonl.\n")
  os.replace(os.path.join(parent, 'sweep.md.tmp'), os.path.join(parent, 'sweep.md'))
  return lines


# ----------------------------------------------------------------------------------------------
# The command.
# ----------------------------------------------------------------------------------------------
def _split_overrides(argv):
  """Separates --config.<key>=<value> overrides (passed on to every run) from the sweep's flags."""
  overrides, rest = [], []
  for arg in argv:
    (overrides if _OVERRIDE.match(arg) else rest).append(arg)
  return overrides, rest


_OVERRIDES = []


def _parse_flags(argv):
  overrides, rest = _split_overrides(argv[1:])
  _OVERRIDES.extend(overrides)
  return flags.FLAGS(argv[:1] + rest)


def main(argv):
  del argv
  parent, config = _WORKDIR.value, _CONFIG.value
  try:
    axes = parse_grid(_GRID.value)
    runs = plan(axes)
  except ValueError as e:
    sys.exit(str(e))
  keys = [_OVERRIDE.match(o).group(2).split('=', 1)[0] for o in _OVERRIDES]
  bare = [o for o in _OVERRIDES if '=' not in o and not _OVERRIDE.match(o).group(1)]
  both = sorted(set(keys) & {k for k, _ in axes})
  problems = check_keys(config, keys + [k for k, _ in axes])
  problems += [f'{o}: give overrides as --config.<key>=<value>, which every run gets as is.'
               for o in bare]
  problems += [f'config.{k} is both a --grid axis and a --config override.' for k in both]
  if problems:
    sys.exit('\n'.join(problems))
  command = shlex.join(['python', '-m', 'mocojax.sweep', f'--config={config}',
                        f'--workdir={parent}', *(f'--grid={g}' for g in _GRID.value),
                        *_OVERRIDES])

  # Stale arguments would make a skipped run answer another question than the table asks.
  for run in runs:
    marker = read_marker(os.path.join(parent, run.name))
    if marker and marker.get('args') != run.args(config, _OVERRIDES):
      sys.exit(f'{os.path.join(parent, run.name)} finished with other arguments '
               f'({shlex.join(marker.get("args", []))}); use another --workdir, or delete it.')

  if _DRY_RUN.value:
    for run in runs:
      marker = read_marker(os.path.join(parent, run.name))
      print(f'{run.name}: {marker["status"] if marker else "to run"}\n  '
            f'{shlex.join(run.args(config, _OVERRIDES))}')
    return

  os.makedirs(parent, exist_ok=True)
  # One sweep per parent: an flock dies with its process, so a killed sweep leaves no lock.
  lock = open(os.path.join(parent, 'sweep.lock'), 'w')
  try:
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    sys.exit(f'Another sweep is running in {parent}.')

  outcomes = {}
  with _Signals() as signals:
    for i, run in enumerate(runs):
      run_dir = os.path.join(parent, run.name)
      marker = read_marker(run_dir)
      if marker:
        print(f'[{i + 1}/{len(runs)}] {run.name}: {marker["status"]} before, skipped', flush=True)
        continue
      print(f'[{i + 1}/{len(runs)}] {run.name}: running (log: {run_dir}/train.log)', flush=True)
      args = run.args(config, _OVERRIDES)
      outcome = run_one(run_dir, args, signals)
      outcomes[run.name] = outcome
      if outcome['status'] in ('done', 'diverged'):
        _write_marker(run_dir, dict(outcome, args=args))
      print(f'[{i + 1}/{len(runs)}] {run.name}: {outcome["status"]} in {outcome["seconds"]:.0f}s'
            + (f': {outcome["message"]}' if outcome.get('message') else ''), flush=True)
      write_summary(parent, runs, outcomes, command)
      if signals.signum is not None:
        break
  lines = write_summary(parent, runs, outcomes, command)
  print('\n'.join(lines))
  print(f'{os.path.join(parent, "sweep.md")}\n{os.path.join(parent, "sweep.png")}')
  if signals.signum is not None:
    print(f'Stopped by {signal.Signals(signals.signum).name}: rerun the same command to '
          'continue.', file=sys.stderr)
    sys.exit(128 + signals.signum)


if __name__ == '__main__':
  _define_flags()
  app.run(main, flags_parser=_parse_flags)
