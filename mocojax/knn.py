"""kNN accuracy of a pretraining checkpoint: `python -m mocojax.knn --workdir=runs/demo`.

The monitor the trainer runs every `eval.knn_every_epochs`, on any saved step: the base
backbone's features (ViT: [CLS] after the final LayerNorm; ResNet: global average pool) in
inference mode, L2-normalised; the train split, centre-cropped, as the bank; the eval split as
queries; votes exp(s/T) over the top-k cosine neighbours. Bank and queries stay sharded over
all devices (and hosts). k, T, the splits and the batch default to the run's config.

Prints one line per k and writes <workdir>/knn/step_<N>.json (accuracies with k, T, the feature
and the splits used), so every reported figure says how it was made.
"""

import json
import os

from absl import app, flags, logging

_WORKDIR = flags.DEFINE_string('workdir', None, 'The pretraining run.', required=True)
_STEP = flags.DEFINE_integer('step', None, 'Checkpoint step; default: the latest.')
_KS = flags.DEFINE_list('ks', None, 'Neighbour counts; default: the run\'s eval.knn_ks.')
_TEMPERATURE = flags.DEFINE_float('temperature', None,
                                  'Vote temperature T; default: the run\'s eval.knn_temperature.')
_BATCH = flags.DEFINE_integer('batch_size', None,
                              'Global feature batch; default: the run\'s eval.batch_size.')
_DATA_DIR = flags.DEFINE_string('data_dir', None, 'Where the data lives, if not where the run '
                                'read it.')
_BANK = flags.DEFINE_string('bank_split', None, 'Bank split; default: the run\'s train split.')
_QUERY = flags.DEFINE_string('query_split', None, 'Query split; default: the run\'s eval split.')


def evaluate(workdir: str, *, step=None, ks=None, temperature=None, batch_size=None,
             data_dir=None, bank_split=None, query_split=None, mesh=None) -> dict:
  """kNN top-1 of the run's checkpoint; returns the record written to knn/step_<N>.json."""
  import jax

  from mocojax import models, parallel
  from mocojax.data import sources
  from mocojax.evaluation import evaluators
  from mocojax.hand_off import pretraining_run

  mesh = mesh or parallel.make_mesh()
  backbone = pretraining_run.restore_backbone(workdir, step, mesh=mesh)
  config = backbone.config
  d = config.data
  if data_dir:
    d.data_dir = data_dir
  ks = tuple(int(k) for k in (ks or config.eval.knn_ks))
  temperature = float(temperature or config.eval.knn_temperature)
  batch_size = int(batch_size or config.eval.batch_size)
  parallel.check_batch_size(batch_size, '--batch_size')
  bank_split, query_split = bank_split or d.train_split, query_split or d.eval_split
  # Both splits are opened (and fail with the path and the fix) before anything compiles.
  bank_source = sources.get_source(d, bank_split)
  query_source = sources.get_source(d, query_split)
  # The trainer's kNN monitor, on the restored backbone.
  knn = evaluators.Knn(features=backbone.features, variables_of=lambda b: b.variables,
                       bank=bank_source, queries=query_source, data_config=d,
                       batch_size=batch_size, ks=ks, temperature=temperature, mesh=mesh)
  acc = knn.accuracies(backbone)
  record = dict(step=backbone.step, top1={str(k): acc[k] for k in ks}, temperature=temperature,
                feature=models.feature_name(config.model) + ', L2-normalised, inference mode',
                bank=f'{d.name}:{bank_split} ({bank_source.num_examples}, centre crop)',
                queries=f'{d.name}:{query_split} ({query_source.num_examples})')
  if jax.process_index() == 0:
    os.makedirs(os.path.join(workdir, 'knn'), exist_ok=True)
    with open(os.path.join(workdir, 'knn', f'step_{backbone.step}.json'), 'w') as f:
      json.dump(record, f, indent=2)
  return record


def main(argv):
  del argv
  from mocojax import commands
  commands.start_host()
  r = evaluate(_WORKDIR.value, step=_STEP.value, ks=_KS.value, temperature=_TEMPERATURE.value,
               batch_size=_BATCH.value, data_dir=_DATA_DIR.value, bank_split=_BANK.value,
               query_split=_QUERY.value)
  logging.info('kNN: %s', r)
  for k, v in r['top1'].items():
    print(f'step {r["step"]}: kNN top-1 {100 * v:.2f}% (k={k}, T={r["temperature"]:g}; '
          f'{r["feature"]}; bank {r["bank"]}, queries {r["queries"]})')


if __name__ == '__main__':
  app.run(main)
