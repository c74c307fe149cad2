"""Pretrain: `python -m mocojax.main --config=configs/demo.py --workdir=runs/demo`.

Any config field can be overridden on the command line, e.g. --config.batch_size=1024.
Rerunning the same command resumes from the latest checkpoint in --workdir.
Multi-host: run the same command on every host (see launch/); JAX finds the other processes
on Cloud TPU VMs and under SLURM, elsewhere pass --coordinator_address, --num_processes and
--process_id.
"""

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/demo.py', 'Training config file.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs and plots.',
                               required=True)
# Multi-process launches where JAX cannot detect the cluster (see mocojax/distributed.py).
_COORDINATOR = flags.DEFINE_string('coordinator_address', None,
                                   'host:port of process 0, for a multi-process launch.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Processes in the job.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process, 0 .. num_processes - 1.')


def main(argv):
  del argv
  # Before anything touches devices: a started backend can no longer join a multi-process job.
  from mocojax import distributed
  distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  distributed.check_same_config(_CONFIG.value, _WORKDIR.value)
  from mocojax import checkpoint
  checkpoint.quiet_orbax_logging()
  import tensorflow as tf
  # tf.data runs on the host; keep TensorFlow off any accelerator JAX is using.
  tf.config.set_visible_devices([], 'GPU')
  from mocojax import train
  summary = train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  logging.info('Done: %s', summary)
  print({k: round(v, 4) for k, v in summary.items()})


if __name__ == '__main__':
  app.run(main)
