"""Export a pretraining run's backbone: `python -m mocojax.export --workdir=runs/demo --out=DIR`.

Writes DIR/model.json and DIR/variables/ (orbax: the base encoder's backbone only) for
`mocojax.hand_off.encoder.load_encoder` and `mocojax.finetune`; --format=safetensors (or
--format=orbax,safetensors) adds DIR/model.safetensors under timm's VisionTransformer names.
"""

from absl import app, flags, logging

_WORKDIR = flags.DEFINE_string('workdir', None, 'The pretraining run to export from.',
                               required=True)
_OUT = flags.DEFINE_string('out', None, 'Encoder directory to write.', required=True)
_FORMAT = flags.DEFINE_list('format', ['orbax'], 'orbax and/or safetensors (comma-separated).')
_STEP = flags.DEFINE_integer('step', None, 'Checkpoint step to export; default the latest.')


def main(argv):
  del argv
  from mocojax import checkpoint
  checkpoint.quiet_orbax_logging()
  from mocojax.hand_off import encoder
  info = encoder.export_encoder(_WORKDIR.value, _OUT.value, step=_STEP.value,
                                formats=_FORMAT.value)
  logging.info('Wrote %s: %s', _OUT.value, info['files'])
  print({'out': _OUT.value, 'files': info['files'], 'feature_dim': info['feature_dim'],
         'step': info['source']['step']})


if __name__ == '__main__':
  app.run(main)
