"""Pretrain: `python -m mocojax.main --config=configs/demo.py --workdir=runs/demo`.

Any config field can be overridden on the command line, e.g. --config.batch_size=1024.
Rerunning the same command resumes from the latest checkpoint in --workdir.
"""

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/demo.py', 'Training config file.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs and plots.',
                               required=True)


def _quiet_orbax(record) -> bool:
  # orbax narrates every save at INFO; keep its warnings, drop the narration.
  return record.levelno >= logging.WARNING or 'orbax' not in record.pathname


def main(argv):
  del argv
  logging.get_absl_logger().addFilter(_quiet_orbax)
  import tensorflow as tf
  # tf.data runs on the host; keep TensorFlow off any accelerator JAX is using.
  tf.config.set_visible_devices([], 'GPU')
  from mocojax import train
  summary = train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  logging.info('Done: %s', summary)
  print({k: round(v, 4) for k, v in summary.items()})


if __name__ == '__main__':
  app.run(main)
