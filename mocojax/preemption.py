"""Preemption: SIGTERM or SIGINT asks the loop to finish its step, save, and stop.

A preempted Cloud TPU VM, a SLURM job at its time limit or a Kubernetes pod gets SIGTERM and a
grace period (30 s on a spot TPU VM) before SIGKILL; Ctrl-C sends SIGINT. Python's defaults
would end the process at once and lose everything since the last periodic save.

One process: a signal handler sets a flag; the loop polls it after each step.
Several processes: all of them must save the same step, or orbax's collective save hangs.
JAX's preemption service (on by default under `jax.distributed`) catches SIGTERM on any host,
agrees on a step across hosts through the coordination service, and
`multihost_utils.reached_preemption_sync_point(step)` turns true on every host at that step.
SIGINT has no such agreement, so a multi-process run keeps Python's default for it.
"""

import signal
import sys
import threading

import jax
from absl import logging
from jax.experimental import multihost_utils


class Preempted(Exception):
  """The run saved its state after a SIGTERM/SIGINT and stopped; rerun the command to resume."""

  def __init__(self, message: str, signum: int):
    super().__init__(message)
    self.exit_code = 128 + signum  # what a shell reports for a process ended by the signal


class Watcher:
  """Context manager: `requested(step)` is True once every process should save and stop."""

  def __init__(self):
    self.signum = None
    self._previous = {}

  def __enter__(self):
    signals = [signal.SIGTERM, signal.SIGINT] if jax.process_count() == 1 else []
    if threading.current_thread() is not threading.main_thread():
      logging.warning('Not on the main thread: SIGTERM/SIGINT will not save before exiting.')
      signals = []
    for s in signals:
      self._previous[s] = signal.signal(s, self._handle)
    return self

  def __exit__(self, *exc):
    for s, handler in self._previous.items():
      signal.signal(s, handler)
    self._previous = {}

  def _handle(self, signum, frame):
    del frame
    if self.signum == signal.SIGINT and signum == signal.SIGINT:
      raise KeyboardInterrupt  # a second Ctrl-C: the user does not want to wait for the save
    if self.signum is None:
      self.signum = signum
      # Logging from a signal handler can deadlock on the logging lock; stderr cannot.
      sys.stderr.write(f'Received {signal.Signals(signum).name}: finishing this step, then '
                       'saving a checkpoint and stopping (Ctrl-C again to stop at once).\n')

  def requested(self, step: int) -> bool:
    if jax.process_count() > 1:
      if multihost_utils.reached_preemption_sync_point(step):
        self.signum = self.signum or signal.SIGTERM
        return True
      return False
    return self.signum is not None
