"""Weighted kNN evaluation (InstDisc / MoCo Colab protocol), sharded over a 'data' mesh axis.

For every query, the k most cosine-similar bank entries each vote for their class with weight
exp(s / T); the class with the largest total wins. The bank stays row-sharded: every device scores
the whole query chunk against its own rows, keeps its local top-k, and only those [chunk, k]
candidates are all-gathered and merged. Memory and traffic per chunk are therefore independent of
the bank size, which is what lets this run on a 1.28M-row ImageNet bank.

Tie rules (deterministic):
  * neighbours with equal similarity: the lower bank row index is taken first (`lax.top_k` documents
    this, and the per-shard candidates are merged in device order, which is row order);
  * classes with equal score: the lower class index wins (`jnp.argmax` returns the first maximum).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXIS = 'data'
_EPS = 1e-12  # as in F.normalize: zero rows (e.g. padding) give zero similarity instead of NaN


def default_mesh() -> Mesh:
  return Mesh(np.array(jax.devices()), (AXIS,))


def shard_rows(x, mesh: Mesh, fill=0):
  """Places `x` row-sharded over 'data', padding rows with `fill` up to a multiple of the axis size.

  Numpy input is never copied whole: each device pulls (and pads) only its own slice.
  """
  n = x.shape[0]
  n_pad = -(-n // mesh.shape[AXIS]) * mesh.shape[AXIS]
  sharding = NamedSharding(mesh, P(AXIS))
  if isinstance(x, jax.Array):
    if n_pad == n:
      return jax.device_put(x, sharding)  # no-op when already laid out this way
    pad = [(0, n_pad - n)] + [(0, 0)] * (x.ndim - 1)
    return jax.jit(lambda a: jnp.pad(a, pad, constant_values=fill), out_shardings=sharding)(x)

  x = np.asarray(x)

  def local_rows(index):
    start, stop, _ = index[0].indices(n_pad)
    rows = x[start:min(stop, n)]
    pad = [(0, stop - start - rows.shape[0])] + [(0, 0)] * (x.ndim - 1)
    return np.pad(rows, pad, constant_values=fill)

  return jax.make_array_from_callback((n_pad,) + x.shape[1:], sharding, local_rows)


@jax.jit
def _inverse_norms(bank):
  # Scaling similarity columns by 1/|b| is the same as normalising the bank, without
  # materialising a second bank-sized array.
  norms = jnp.linalg.norm(bank.astype(jnp.float32), axis=-1)
  return 1.0 / jnp.maximum(norms, _EPS)


@functools.lru_cache(maxsize=None)
def _build_predict(mesh: Mesh, ks: tuple, num_classes: int, temperature: float):
  """Returns jit(query_chunk, bank, inv_norm, bank_labels, bank_mask) -> {k: predictions}.

  Cached so that repeated evaluations (e.g. every few epochs) reuse one compiled program.
  """
  k_max = max(ks)

  def local_topk(queries, bank, inv_norm, labels, mask):
    q = queries.astype(jnp.float32)
    q = q / jnp.maximum(jnp.linalg.norm(q, axis=-1, keepdims=True), _EPS)
    sim = jnp.dot(q.astype(bank.dtype), bank.T, preferred_element_type=jnp.float32)
    sim = jnp.where(mask, sim * inv_norm, -jnp.inf)
    short = k_max - sim.shape[1]
    if short > 0:
      # A shard can hold fewer rows than k; -inf columns carry zero vote weight.
      sim = jnp.pad(sim, ((0, 0), (0, short)), constant_values=-jnp.inf)
      labels = jnp.pad(labels, (0, short))
    sim, idx = lax.top_k(sim, k_max)
    return sim, labels[idx]

  def predict(queries, bank, inv_norm, labels, mask):
    sim, lab = local_topk(queries, bank, inv_norm, labels, mask)
    # Device order is row order, so top_k's lower-position-first rule keeps lower rows first.
    sim = lax.all_gather(sim, AXIS, axis=1, tiled=True)
    lab = lax.all_gather(lab, AXIS, axis=1, tiled=True)
    sim, pos = lax.top_k(sim, k_max)
    lab = jnp.take_along_axis(lab, pos, axis=1)

    # Shifting by the best similarity rescales every class score of a query by the same factor
    # (argmax unchanged) and keeps exp() finite however small T is.
    top = sim[:, :1]
    weights = jnp.exp((sim - jnp.where(jnp.isfinite(top), top, 0.0)) / temperature)
    rows = jnp.arange(sim.shape[0])[:, None]
    preds = {}
    for k in ks:
      # Scatter-add rather than one_hot: [chunk, k, classes] would be ~1 GB for ImageNet.
      scores = jnp.zeros((sim.shape[0], num_classes), jnp.float32)
      scores = scores.at[rows, lab[:, :k]].add(weights[:, :k])
      preds[k] = jnp.argmax(scores, axis=-1)
    return preds

  sharded = jax.shard_map(
      predict, mesh=mesh,
      in_specs=(P(), P(AXIS), P(AXIS), P(AXIS), P(AXIS)),
      out_specs=P(),
      check_vma=False,  # the all_gathered merge is identical on every device; out_specs=P() says so
  )
  return jax.jit(sharded)


def knn_predict(bank_features, bank_labels, query_features, *, num_classes, ks=(20, 200),
                temperature=0.07, mesh=None, bank_mask=None, query_chunk=1024) -> dict:
  """Weighted-kNN class predictions for every query row: {k: np.ndarray[int] of len(queries)}.

  Rows where `bank_mask` is False are never neighbours. Inputs may be numpy or jax arrays
  (e.g. already sharded over 'data' by `extract_features`). Each device holds a
  [query_chunk, bank rows per device] float32 similarity block at a time (~650 MB for 1024 queries
  against an 8-way 1.28M bank); lower `query_chunk` if that is too much.
  """
  if mesh is None:
    mesh = default_mesh()
  ks = tuple(int(k) for k in ks)
  predict = _build_predict(mesh, ks, int(num_classes), float(temperature))

  n_bank = bank_features.shape[0]
  if bank_mask is None:
    bank_mask = np.ones(n_bank, bool)
  bank = shard_rows(bank_features, mesh)
  labels = shard_rows(bank_labels, mesh)
  mask = shard_rows(bank_mask, mesh, fill=False)  # rows added for divisibility never count
  inv_norm = _inverse_norms(bank)

  n_query = query_features.shape[0]
  chunk = min(query_chunk, n_query)
  outputs = []
  for start in range(0, n_query, chunk):
    q = jnp.asarray(query_features[start:start + chunk])
    if q.shape[0] < chunk:  # pad the last chunk so every chunk reuses one compilation
      q = jnp.pad(q, ((0, chunk - q.shape[0]), (0, 0)))
    outputs.append(predict(q, bank, inv_norm, labels, mask))
  outputs = jax.device_get(outputs)  # one sync at the end lets chunks run back to back
  return {k: np.concatenate([o[k] for o in outputs])[:n_query] for k in ks}


def knn_accuracy(bank_features, bank_labels, query_features, query_labels, *, num_classes,
                 ks=(20, 200), temperature=0.07, mesh=None, bank_mask=None, query_mask=None,
                 query_chunk=1024) -> dict:
  """Weighted-kNN top-1 accuracy {k: float in [0, 1]}; queries with `query_mask` False don't count."""
  preds = knn_predict(bank_features, bank_labels, query_features, num_classes=num_classes,
                      ks=ks, temperature=temperature, mesh=mesh, bank_mask=bank_mask,
                      query_chunk=query_chunk)
  query_labels = np.asarray(query_labels)
  keep = np.ones(len(query_labels), bool) if query_mask is None else np.asarray(query_mask, bool)
  if not keep.any():
    raise ValueError('no valid queries')
  return {k: float(np.mean(p[keep] == query_labels[keep])) for k, p in preds.items()}
