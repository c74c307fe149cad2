"""What the command-line entry points (main, finetune, linear, knn) share: how the host is set
up before work starts, and how a run's expected stops end the process."""

import contextlib
import sys

from absl import logging


def start_host() -> None:
  """Quiet orbax's per-save narration; keep TensorFlow (tf.data on the host) off any GPU that
  JAX is using."""
  from mocojax import checkpoint
  checkpoint.quiet_orbax_logging()
  import tensorflow as tf
  tf.config.set_visible_devices([], 'GPU')


@contextlib.contextmanager
def exits_for_expected_stops():
  """A preempted run (saved, stopped) exits with 128 + the signal, as a shell reports a process
  ended by it, so schedulers and scripts see what happened. A diverged run, a busy workdir or
  unusable checkpoints exit with their one-line message: a traceback would bury what to do."""
  from mocojax import checkpoint, loop, preemption, workdir_lock
  try:
    yield
  except preemption.Preempted as e:
    logging.warning('%s', e)
    print(e, file=sys.stderr)
    sys.exit(e.exit_code)
  except (loop.DivergenceError, workdir_lock.WorkdirBusyError, checkpoint.CheckpointError) as e:
    sys.exit(str(e))
