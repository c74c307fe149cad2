"""A 2-D t-SNE of feature vectors (van der Maaten & Hinton, 2008), exact, in JAX.

Exact t-SNE costs O(n^2) per iteration, which is a few milliseconds for the couple of thousand
test points a picture needs; no Barnes-Hut approximation and no extra dependency.
"""

import functools

import jax
import jax.numpy as jnp


def _squared_distances(x):
  sq = jnp.sum(x * x, axis=1)
  return jnp.maximum(sq[:, None] + sq[None, :] - 2 * x @ x.T, 0.0)


def affinities(x, perplexity: float = 30.0, iters: int = 64):
  """Symmetric joint probabilities P [n, n]: per-point Gaussian bandwidths found by bisection
  so that each conditional distribution has the given perplexity."""
  n = x.shape[0]
  d = _squared_distances(x.astype(jnp.float32))
  d = d / jnp.mean(d)  # scale-free bisection bounds
  off_diagonal = ~jnp.eye(n, dtype=bool)
  target = jnp.log(perplexity)

  def conditional(beta):
    logits = jnp.where(off_diagonal, -d * beta[:, None], -jnp.inf)
    p = jax.nn.softmax(logits, axis=1)
    entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.maximum(p, 1e-30)), 0.0), axis=1)
    return p, entropy

  def bisect(_, bounds):
    lo, hi = bounds
    mid = jnp.sqrt(lo * hi)  # bandwidths span orders of magnitude: bisect in log space
    _, h = conditional(mid)
    # Entropy falls as beta grows: too much entropy means beta must rise.
    return jnp.where(h > target, mid, lo), jnp.where(h > target, hi, mid)

  lo, hi = jax.lax.fori_loop(0, iters, bisect, (jnp.full(n, 1e-4), jnp.full(n, 1e4)))
  p, _ = conditional(jnp.sqrt(lo * hi))
  return (p + p.T) / (2 * n)


@functools.partial(jax.jit, static_argnames=('steps', 'exaggeration_steps'))
def tsne(x, key, *, perplexity: float = 30.0, steps: int = 1000, exaggeration_steps: int = 250,
         learning_rate: float = 200.0):
  """Returns a [n, 2] embedding of x [n, d] (gradient descent with momentum and gains)."""
  n = x.shape[0]
  p = affinities(x, perplexity)
  y0 = 1e-4 * jax.random.normal(key, (n, 2))

  def grad(y, p):
    w = 1.0 / (1.0 + _squared_distances(y))
    w = w * (1.0 - jnp.eye(n))
    q = w / jnp.sum(w)
    pq = (p - q) * w
    return 4.0 * (jnp.sum(pq, axis=1, keepdims=True) * y - pq @ y)

  def step(carry, t):
    y, velocity, gains = carry
    early = t < exaggeration_steps
    g = grad(y, jnp.where(early, 12.0, 1.0) * p)
    momentum = jnp.where(early, 0.5, 0.8)
    # The "gains" heuristic of the reference implementation: grow steps that keep direction.
    gains = jnp.where(jnp.sign(g) != jnp.sign(velocity), gains + 0.2, gains * 0.8)
    gains = jnp.maximum(gains, 0.01)
    velocity = momentum * velocity - learning_rate * gains * g
    y = y + velocity
    return (y - jnp.mean(y, axis=0), velocity, gains), None

  (y, _, _), _ = jax.lax.scan(step, (y0, jnp.zeros_like(y0), jnp.ones_like(y0)),
                              jnp.arange(steps))
  return y
