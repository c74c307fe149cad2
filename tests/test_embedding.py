"""t-SNE: valid joint affinities, and well-separated clusters stay separated in 2-D."""

import jax
import jax.numpy as jnp
import numpy as np

from mocojax.evaluation import embedding


def _clusters(n_per=60, k=4, dim=16, seed=0):
  rng = np.random.default_rng(seed)
  labels = np.repeat(np.arange(k), n_per)
  return rng.normal(size=(k, dim))[labels] * 5 + rng.normal(size=(k * n_per, dim)), labels


def test_affinities_are_a_symmetric_distribution_favouring_neighbours():
  x, labels = _clusters()
  p = np.asarray(embedding.affinities(jnp.asarray(x), perplexity=10.0))
  np.testing.assert_allclose(p, p.T, atol=1e-9)
  np.testing.assert_allclose(p.sum(), 1.0, rtol=1e-5)
  assert np.all(np.diag(p) == 0) and np.all(p >= 0)
  same = labels[:, None] == labels[None, :]
  assert p[same].sum() > 0.99  # almost all affinity stays inside a cluster


def test_tsne_keeps_clusters_apart():
  x, labels = _clusters()
  y = np.asarray(embedding.tsne(jnp.asarray(x), jax.random.key(0), perplexity=10.0, steps=300,
                                exaggeration_steps=100))
  assert y.shape == (len(x), 2) and np.all(np.isfinite(y))
  d = ((y[:, None] - y[None]) ** 2).sum(-1)
  np.fill_diagonal(d, np.inf)
  neighbours = labels[np.argsort(d, axis=1)[:, :5]]
  assert np.mean(neighbours == labels[:, None]) > 0.95
