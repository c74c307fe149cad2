"""One run per workdir: a lock file naming the holder, refreshed while it runs.

Two runs writing one workdir interleave metrics.jsonl and overwrite each other's checkpoints.
The lock file <workdir>/run.lock holds the host, pid and start time of the run using it and is
rewritten every `HEARTBEAT_S` seconds. A new run refuses a lock whose holder is alive; a lock
left by a killed run is taken over: on the same host when its pid no longer runs, from another
host (a preempted VM replaced by a new one) once its heartbeat is `STALE_S` seconds old.
Only process 0 takes the lock: the other processes run the same config and workdir
(`distributed.check_same_config`).
"""

import json
import os
import socket
import threading
import time

from absl import logging
from etils import epath

HEARTBEAT_S = 30.0
STALE_S = 120.0


class WorkdirBusyError(RuntimeError):
  pass


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True  # exists, owned by someone else
  return True


class WorkdirLock:
  """Context manager holding <workdir>/run.lock for the duration of a run."""

  def __init__(self, workdir, heartbeat_s: float = HEARTBEAT_S, stale_s: float = STALE_S):
    self.path = epath.Path(workdir) / 'run.lock'
    self.heartbeat_s, self.stale_s = heartbeat_s, stale_s
    self.me = dict(host=socket.gethostname(), pid=os.getpid(), started=time.time())
    self._stop = threading.Event()
    self._thread = None

  def _write(self):
    tmp = self.path.parent / f'{self.path.name}.{self.me["host"]}.{self.me["pid"]}.tmp'
    tmp.write_text(json.dumps({**self.me, 'heartbeat': time.time()}))
    tmp.replace(self.path)  # atomic on a local filesystem: readers see a whole file

  def _holder(self):
    try:
      return json.loads(self.path.read_text())
    except FileNotFoundError:
      return None
    except (ValueError, OSError):
      return {}  # unreadable: treat as stale

  def _refuse_reason(self, holder) -> str:
    """Why `holder` still owns the workdir, or '' if its lock is stale."""
    if not holder or holder.get('pid') is None:
      try:  # another run may be between creating the file and writing it
        fresh = time.time() - self.path.stat().mtime < 5
      except OSError:
        fresh = False
      return 'another run is taking it' if fresh else ''
    age = time.time() - holder.get('heartbeat', 0)
    if holder['host'] == self.me['host']:
      if holder['pid'] == self.me['pid'] or not _pid_alive(holder['pid']):
        return ''
      return f'process {holder["pid"]} on this host ({holder["host"]}) is running in it'
    if age > self.stale_s:
      return ''
    return (f'process {holder["pid"]} on host {holder["host"]} is running in it (its lock was '
            f'refreshed {age:.0f} s ago)')

  def __enter__(self):
    self.path.parent.mkdir(parents=True, exist_ok=True)
    if not str(self.path).startswith('gs://'):
      # Create-if-absent is atomic locally, so two runs starting together cannot both win.
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        with os.fdopen(fd, 'w') as f:
          json.dump({**self.me, 'heartbeat': time.time()}, f)
        return self._start()
      except FileExistsError:
        pass
    holder = self._holder()
    reason = self._refuse_reason(holder) if holder is not None else ''
    if reason:
      since = (time.strftime(', since %Y-%m-%d %H:%M:%S', time.localtime(holder['started']))
               if holder.get('started') else '')
      raise WorkdirBusyError(
          f'{self.path.parent} is in use: {reason}{since}. Stop that run or use '
          f'another --workdir; if no run uses it, delete {self.path}.')
    if holder:
      logging.warning('Taking over the lock %s left by process %s on %s (no longer running).',
                      self.path, holder.get('pid'), holder.get('host'))
    self._write()
    return self._start()

  def _start(self):
    def beat():
      while not self._stop.wait(self.heartbeat_s):
        try:
          self._write()
        except OSError as e:  # a flaky filesystem must not stop training
          logging.warning('Could not refresh %s: %s', self.path, e)
    self._thread = threading.Thread(target=beat, name='workdir-lock', daemon=True)
    self._thread.start()
    return self

  def __exit__(self, *exc):
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
    holder = self._holder()
    if holder and holder.get('pid') == self.me['pid'] and holder.get('host') == self.me['host']:
      self.path.unlink()
