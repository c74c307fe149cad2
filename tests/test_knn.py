"""kNN evaluator and feature extraction, on 1 and 8 (CPU) devices.

The 8-device cases run in-process when XLA_FLAGS=--xla_force_host_platform_device_count=8 is set
(as in CI); otherwise `test_eight_devices_in_subprocess` reruns them in a child process that sets it.
"""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mocojax.evaluation.features import extract_features
from mocojax.evaluation.knn import knn_accuracy, knn_predict

DEVICES = pytest.mark.parametrize('n_devices', [1, 8], ids=['devices1', 'devices8'])
KS = (1, 5, 20, 200, 400)  # 200 exceeds an 8-way shard of the bank; 400 exceeds the whole bank
T = 0.07


def make_mesh(n_devices):
  if jax.device_count() < n_devices:
    pytest.skip(f'needs {n_devices} devices (see test_eight_devices_in_subprocess)')
  return Mesh(np.array(jax.devices()[:n_devices]), ('data',))


def numpy_knn(bank, bank_labels, queries, num_classes, k, temperature):
  """The protocol written out plainly, in float64, one query at a time."""
  bank = bank / np.linalg.norm(bank, axis=1, keepdims=True)
  queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
  preds = []
  for q in queries:
    sim = bank @ q
    neighbours = np.argsort(-sim, kind='stable')[:k]  # stable: lower row first on ties
    scores = np.zeros(num_classes)
    for i in neighbours:
      scores[bank_labels[i]] += np.exp(sim[i] / temperature)
    preds.append(np.argmax(scores))  # first maximum: lower class first on ties
  return np.array(preds)


def clustered(rng, n, centres):
  labels = rng.integers(0, len(centres), n)
  return centres[labels] + rng.normal(size=(n, centres.shape[1])), labels


def padded_problem(seed=0, num_classes=5, dim=16):
  """300 real bank rows and 70 real queries, plus 21 and 10 padding rows that change the answer if
  they count.

  Padded bank rows are exact copies of queries with a wrong label (they'd be every such query's
  nearest neighbour); padded queries copy bank rows with their labels (always right if counted).
  Padding is scattered among real rows, not only at the end.
  """
  rng = np.random.default_rng(seed)
  centres = 0.5 * rng.normal(size=(num_classes, dim))  # overlapping classes, so k changes the answer
  bank, bank_labels = clustered(rng, 300, centres)
  queries, query_labels = clustered(rng, 70, centres)

  def insert_padding(x, labels, fake_x, fake_labels):
    n = len(x) + len(fake_x)
    fake_rows = np.sort(rng.choice(n, len(fake_x), replace=False))
    mask = np.ones(n, bool)
    mask[fake_rows] = False
    all_x, all_labels = np.empty((n, dim)), np.empty(n, int)
    all_x[mask], all_labels[mask] = x, labels
    all_x[~mask], all_labels[~mask] = fake_x, fake_labels
    return all_x.astype(np.float32), all_labels.astype(np.int32), mask

  # 321 rows: not a multiple of 8, so the evaluator must also add rows of its own.
  padded_bank = insert_padding(bank, bank_labels, queries[:21], (query_labels[:21] + 1) % num_classes)
  padded_queries = insert_padding(queries, query_labels, bank[:10], bank_labels[:10])
  return padded_bank, padded_queries, num_classes


@DEVICES
@pytest.mark.parametrize('as_jax', [False, True], ids=['numpy', 'jax'])
def test_matches_numpy_with_padding(n_devices, as_jax):
  mesh = make_mesh(n_devices)
  (bank, bank_labels, bank_mask), (queries, query_labels, query_mask), num_classes = padded_problem()
  if as_jax:
    bank, bank_labels, bank_mask, queries = map(jnp.asarray, (bank, bank_labels, bank_mask, queries))
  kwargs = dict(num_classes=num_classes, ks=KS, temperature=T, mesh=mesh, bank_mask=bank_mask,
                query_chunk=32)  # 80 queries -> 3 chunks, the last one padded

  preds = knn_predict(bank, bank_labels, queries, **kwargs)
  accuracy = knn_accuracy(bank, bank_labels, queries, query_labels, query_mask=query_mask, **kwargs)

  real_bank = np.asarray(bank)[np.asarray(bank_mask)]
  real_bank_labels = np.asarray(bank_labels)[np.asarray(bank_mask)]
  for k in KS:
    expected = numpy_knn(real_bank, real_bank_labels, queries[query_mask], num_classes, k, T)
    np.testing.assert_array_equal(preds[k][query_mask], expected, err_msg=f'k={k}')
    assert accuracy[k] == pytest.approx(np.mean(expected == query_labels[query_mask]))
    assert isinstance(accuracy[k], float)
  assert len(set(accuracy.values())) > 1  # the problem is not degenerate: k matters


@DEVICES
def test_ties_are_deterministic(n_devices):
  mesh = make_mesh(n_devices)
  # Exactly representable vectors, so equal similarities are equal bit for bit on any backend.
  eye = np.eye(4, dtype=np.float32)
  bank = np.tile(eye[1:], (6, 1))[:16]  # similarity 0 to the query
  labels = np.full(16, 2, np.int32)
  bank[3], labels[3] = eye[0], 4  # similarity 1 ...
  bank[12], labels[12] = 2 * eye[0], 2  # ... and 1 again (after normalisation), on another shard
  labels[0] = 4  # the lowest-row similarity-0 entry, on the first shard
  query = eye[:1]

  preds = knn_predict(bank, labels, query, num_classes=5, ks=(1, 2, 3), mesh=mesh)
  # k=1: equal similarity -> the lower bank row (3, class 4) is the neighbour, not row 12.
  assert preds[1][0] == 4
  # k=2: rows 3 and 12 give classes 4 and 2 equal scores -> the lower class index wins.
  assert preds[2][0] == 2
  # k=3: the third neighbour is the lowest row among the 13 equal similarity-0 rows (row 0,
  # class 4), so class 4 leads by exp(0); any other row would hand the win to class 2.
  assert preds[3][0] == 4


@DEVICES
def test_extract_features_matches_numpy(n_devices):
  mesh = make_mesh(n_devices)
  rows = NamedSharding(mesh, P('data'))
  rng = np.random.default_rng(1)
  num, batch, dim_in, dim_out = 40, 16, 6, 3
  images = rng.normal(size=(num, dim_in)).astype(np.float32)
  labels = rng.integers(0, 4, num).astype(np.int32)
  variables = {'w': rng.normal(size=(dim_in, dim_out)).astype(np.float32),
               'b': rng.normal(size=dim_out).astype(np.float32)}

  def batches():  # 40 rows -> 3 global batches of 16, the last with 8 rows of junk padding
    for start in range(0, num, batch):
      x, y = images[start:start + batch], labels[start:start + batch]
      pad = batch - len(x)
      yield {'image': jax.device_put(np.pad(x, ((0, pad), (0, 0)), constant_values=1e3), rows),
             'label': jax.device_put(np.pad(y, (0, pad)), rows),
             'mask': jax.device_put(np.arange(batch) < len(x), rows)}

  def feature_fn(v, x):
    return x @ v['w'] + v['b']

  features, out_labels, mask = extract_features(feature_fn, variables, batches(), mesh=mesh)

  assert features.shape == (48, dim_out)
  for out in (features, out_labels, mask):
    assert out.sharding.is_equivalent_to(rows, out.ndim)
  np.testing.assert_array_equal(np.asarray(mask), np.arange(48) < num)
  np.testing.assert_array_equal(np.asarray(out_labels)[:num], labels)
  np.testing.assert_allclose(np.asarray(features)[:num], images @ variables['w'] + variables['b'],
                             rtol=1e-5, atol=1e-5)

  # Sharded outputs feed kNN directly, masks included (the junk rows sit far from everything).
  accuracy = knn_accuracy(features, out_labels, features, out_labels, num_classes=4, ks=(1, 20),
                          mesh=mesh, bank_mask=mask, query_mask=mask)
  real = np.asarray(features)[:num]
  for k in (1, 20):
    expected = numpy_knn(real, labels, real, 4, k, 0.07)
    assert accuracy[k] == pytest.approx(np.mean(expected == labels))


def test_eight_devices_in_subprocess():
  if jax.device_count() >= 8:
    pytest.skip('8-device cases already ran in this process')
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get('PYTHONPATH')])),
             XLA_FLAGS=os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8')
  result = subprocess.run(
      [sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', __file__, '-k', 'devices8'],
      env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stdout + result.stderr
  assert 'skipped' not in result.stdout.splitlines()[-1], result.stdout
