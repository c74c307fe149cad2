"""What the command-line entry points (main, finetune, linear, knn) share: how the host is set
up before work starts, and how a run's expected stops end the process."""

import contextlib
import ctypes
import sys

from absl import logging

# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def reuse_large_blocks(limit: int = 1 << 30) -> bool:
  """Lets glibc's malloc serve and keep blocks up to `limit` bytes in its heaps. True if set.

  By default glibc maps every block above a threshold (at most 32 MiB) afresh and unmaps it
  when freed, so a buffer of that size allocated every step is faulted in page by page every
  step. On the CPU backend XLA's buffers come from malloc: the device half's float32 views at
  batch 64 are 38.5 MB each: ~240 page faults per sample, ~4% of the input pipeline's CPU time
  end to end (bench/RESULTS.md, session 10). Raising the mmap threshold (and the trim
  threshold, or freed heap tops go back to the OS and fault in again) reuses them. A no-op
  where the C library has no mallopt (macOS, musl).
  """
  mallopt = getattr(ctypes.CDLL(None), 'mallopt', None)
  if mallopt is None:
    return False
  return bool(mallopt(_M_MMAP_THRESHOLD, limit)) and bool(mallopt(_M_TRIM_THRESHOLD, limit))


def start_host() -> None:
  """Quiet orbax's per-save narration; keep TensorFlow (tf.data on the host) off any GPU that
  JAX is using; on the CPU backend, keep XLA's large buffers in malloc's heaps.

  It starts JAX's backend (to ask which it is), so a multi-process command calls it after
  `distributed.initialize`, as main does."""
  from mocojax import checkpoint
  checkpoint.quiet_orbax_logging()
  import tensorflow as tf
  tf.config.set_visible_devices([], 'GPU')
  import jax
  if jax.default_backend() == 'cpu':
    reuse_large_blocks()


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
