"""Pretrain: `python -m mocojax.main --config=configs/demo.py --workdir=runs/demo`.

Any config field can be overridden on the command line, e.g. --config.batch_size=1024.
Rerunning the same command resumes from the latest checkpoint in --workdir.
Multi-host: run the same command on every host (see launch/); JAX finds the other processes
on Cloud TPU VMs and under SLURM, elsewhere pass --coordinator_address, --num_processes and
--process_id.
"""

import contextlib
import importlib.util
import re
import sys

from absl import app, flags, logging
from ml_collections import config_flags


def _config_file(argv, default: str) -> str:
  """The --config=FILE (or --config FILE) of a command line."""
  for i, arg in enumerate(argv):
    if re.match(r'-{1,2}config(=|$)', arg):
      return arg.split('=', 1)[1] if '=' in arg else argv[min(i + 1, len(argv) - 1)]
  return default


def _unknown_overrides(argv, default_config: str) -> list:
  """One line per --config.<key> that the config file does not have, with a did-you-mean."""
  from mocojax import validate
  argv = flags.FLAGS.read_flags_from_files(argv, force_gnu=False)  # as config_flags reads them
  # Loaded as config_flags loads it: 'file.py:arg' calls get_config('arg').
  path, *args = _config_file(argv, default_config).split(':', 1)
  spec = importlib.util.spec_from_file_location('_overridden_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(*args)
  keys = [m.group(1) for m in (re.match(r'-{1,2}(?:no)?config\.([^=]+)', a) for a in argv) if m]
  return [line for line in (validate.unknown_key(config, k) for k in keys) if line]


@contextlib.contextmanager
def _explained_unknown_overrides(argv, default_config: str):
  """ml_collections applies --config.<key> overrides while parsing flags and meets an unknown
  key as a bare KeyError/AttributeError ('lrr'); turn that into one line per bad key."""
  try:
    yield
  except (KeyError, AttributeError):
    try:
      lines = _unknown_overrides(argv, default_config)
    except Exception:  # the config itself is broken: its own error says more
      lines = []
    if not lines:
      raise
    sys.exit('\n'.join(lines))


_DEFAULT_CONFIG = 'configs/demo.py'
# Without --config on the command line the default file is loaded, and overridden, right here.
with _explained_unknown_overrides(sys.argv, _DEFAULT_CONFIG):
  _CONFIG = config_flags.DEFINE_config_file('config', _DEFAULT_CONFIG, 'Training config file.',
                                            lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs and plots.',
                               required=True)
# Multi-process launches where JAX cannot detect the cluster (see mocojax/distributed.py).
_COORDINATOR = flags.DEFINE_string('coordinator_address', None,
                                   'host:port of process 0, for a multi-process launch.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Processes in the job.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process, 0 .. num_processes - 1.')


def _parse_flags(argv):
  with _explained_unknown_overrides(argv, _DEFAULT_CONFIG):
    return app.parse_flags_with_usage(argv)


def main(argv):
  del argv
  # Before anything touches devices: a started backend can no longer join a multi-process job.
  from mocojax import distributed
  distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  # Every bad setting at once, one line each, before TensorFlow, data or compilation.
  from mocojax import validate
  try:
    validate.check(_CONFIG.value)
  except validate.ConfigError as e:
    sys.exit(str(e))
  distributed.check_same_config(_CONFIG.value, _WORKDIR.value)
  from mocojax import commands
  commands.start_host()
  from mocojax import train
  with commands.exits_for_expected_stops():
    summary = train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  logging.info('Done: %s', summary)
  print({k: round(v, 4) for k, v in summary.items()})


if __name__ == '__main__':
  app.run(main, flags_parser=_parse_flags)
