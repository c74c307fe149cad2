"""Fine-tune an exported encoder with labels:

  python -m mocojax.finetune --encoder=runs/demo_encoder --config=configs/finetune_demo.py \
      --workdir=runs/demo_finetune

--encoder is a directory written by `python -m mocojax.export`. Writes metrics.jsonl and
result.json (top-1 on the eval split) to --workdir.
"""

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/finetune_demo.py',
                                          'Fine-tuning config file.', lock_config=True)
_ENCODER = flags.DEFINE_string('encoder', None, 'Exported encoder directory.', required=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for logs and results.',
                               required=True)


def main(argv):
  del argv
  from mocojax import commands
  commands.start_host()
  from mocojax.downstream import fine_tuning
  with commands.exits_for_expected_stops():
    result = fine_tuning.run(_ENCODER.value, _CONFIG.value, _WORKDIR.value)
  logging.info('Done: %s', result)
  print({'top1': round(result['top1'], 4), 'steps': result['steps']})


if __name__ == '__main__':
  app.run(main)
