"""`python -m mocojax.knn`: a checkpoint's kNN accuracy equals brute force on the same images."""

import gzip
import json

import jax
import numpy as np

from mocojax import knn as knn_command
from mocojax.data import pipeline, sources
from mocojax.hand_off import pretraining_run as run_lib


def _write_idx(path, array):
  header = bytes([0, 0, 8, array.ndim]) + b''.join(d.to_bytes(4, 'big') for d in array.shape)
  with gzip.open(path, 'wb') as f:
    f.write(header + array.astype(np.uint8).tobytes())


def _tiny_fashion_mnist(directory, rng):
  """IDX files of 100 train and 36 test images (3 classes: bright square in one of 3 places)."""
  for prefix, n in (('train', 100), ('t10k', 36)):
    labels = rng.integers(0, 3, n)
    images = rng.integers(0, 60, (n, 28, 28))
    for i, c in enumerate(labels):
      images[i, 4 + 7 * c:12 + 7 * c, 6:22] += 150
    _write_idx(directory / f'{prefix}-images-idx3-ubyte.gz', images)
    _write_idx(directory / f'{prefix}-labels-idx1-ubyte.gz', labels)


def _brute_force_knn(bank, bank_labels, queries, k, t, num_classes):
  bank = bank / np.linalg.norm(bank, axis=1, keepdims=True)
  queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
  sims = queries.astype(np.float64) @ bank.T.astype(np.float64)
  top = np.argsort(-sims, axis=1, kind='stable')[:, :k]
  votes = np.zeros((len(queries), num_classes))
  for q in range(len(queries)):
    np.add.at(votes[q], bank_labels[top[q]], np.exp(sims[q, top[q]] / t))
  return votes.argmax(1)


def test_knn_command_matches_brute_force(pretraining_run, tmp_path):
  workdir, _ = pretraining_run
  data = tmp_path / 'data'
  data.mkdir()
  _tiny_fashion_mnist(data, np.random.default_rng(0))
  # 100 and 36 examples in global batches of 16 over 8 devices: both splits end in padding.
  record = knn_command.evaluate(str(workdir), ks=['5', '200'], temperature=0.1, batch_size=16,
                                data_dir=str(data))

  # The same images through the backbone directly, without the sharded feature path.
  backbone = run_lib.restore_backbone(str(workdir))
  d = backbone.config.data
  d.data_dir = str(data)
  feats = {}
  for split in ('train', 'test'):
    source = sources.get_source(d, split)
    ds = pipeline.eval_dataset(source, global_batch=16, image_size=d.image_size,
                               process_index=0, process_count=1)
    rows = [b for b in ds.as_numpy_iterator()]
    pixels = np.concatenate([b['image'] for b in rows])[:source.num_examples] / 255.0
    images = (pixels - np.asarray(d.mean)) / np.asarray(d.std)
    labels = np.concatenate([b['label'] for b in rows])[:source.num_examples]
    feats[split] = (np.asarray(jax.jit(backbone.features)(backbone.variables, images)), labels)
  (bank, bank_labels), (queries, query_labels) = feats['train'], feats['test']
  for k in (5, 200):   # 200 > the 100-image bank: every neighbour votes
    want = np.mean(_brute_force_knn(bank, bank_labels, queries, k, 0.1, 3) == query_labels)
    assert abs(record['top1'][str(k)] - want) < 1e-9, (k, record['top1'], want)

  assert record['step'] == 7 and record['temperature'] == 0.1
  assert '[CLS]' in record['feature'] and '(100, centre crop)' in record['bank']
  saved = json.loads((workdir / 'knn' / 'step_7.json').read_text())
  assert saved == json.loads(json.dumps(record))
