"""Linear probe of a pretraining run: `python -m mocojax.linear --workdir=runs/demo`.

--config defaults to configs/linear_probe.py (the papers' protocol, recipe from the run); any
field can be overridden, e.g. --config.fast=True --config.lr_multipliers='(0.1,1.0)'.
Writes <workdir>/linear_probe/{metrics.jsonl,result.json} unless --outdir says otherwise.
"""

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/linear_probe.py',
                                          'Linear-probe config file.', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'The pretraining run to probe.', required=True)
_OUTDIR = flags.DEFINE_string('outdir', None, 'Where to write results; default '
                              '<workdir>/linear_probe.')


def main(argv):
  del argv
  from mocojax import commands
  commands.start_host()
  from mocojax.downstream import linear_probe
  with commands.exits_for_expected_stops():
    result, _ = linear_probe.run(_WORKDIR.value, _CONFIG.value, outdir=_OUTDIR.value)
  logging.info('Done: %s', result)
  print({k: result[k] for k in ('top1', 'best_lr', 'top1_by_lr', 'mode')})


if __name__ == '__main__':
  app.run(main)
