"""Fixtures of the hand-off tests: a saved pretraining run of a tiny ViT, and a toy dataset."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mocojax import checkpoint as ckpt_lib
from mocojax import step as step_lib
from mocojax.data.sources import Source

RUN_STEP = 7  # the step the fixtures' checkpoints are saved at


def _random_like(abstract, seed=0):
  """Values for an abstract train state without running (or compiling) the init: fan-in scaled
  normal kernels, scales and BN variances near 1, other vectors near 0."""
  rng = np.random.default_rng(seed)

  def fill(path, a):
    name = jax.tree_util.keystr(path[-1:], simple=True)
    if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
      return jax.random.key(seed)
    if not jnp.issubdtype(a.dtype, jnp.floating):
      return np.zeros(a.shape, a.dtype)
    if a.ndim >= 2:
      return (rng.standard_normal(a.shape) / np.sqrt(np.prod(a.shape[:-1]))).astype(a.dtype)
    if name in ('scale', 'var'):
      return (1 + rng.uniform(0, 0.2, a.shape)).astype(a.dtype)
    return (0.1 * rng.standard_normal(a.shape)).astype(a.dtype)

  return jax.tree_util.tree_map_with_path(fill, abstract)


def write_pretraining_run(config, workdir, step: int = RUN_STEP, random_values=False):
  """A run directory as the trainer leaves it (config.json + a checkpoint), without training.

  `random_values` skips the init (slow for a ResNet on CPU) and saves random values of the
  right shapes, BN running statistics included. Returns the saved TrainState.
  """
  _, _, init_fn, _ = step_lib.build(config, steps_per_epoch=10, channels=1)
  size = config.data.image_size
  args = (jax.random.key(config.seed), jnp.zeros((1, size, size, 1)))
  state = _random_like(jax.eval_shape(init_fn, *args)) if random_values else init_fn(*args)
  checkpointer = ckpt_lib.Checkpointer(str(workdir), config, every_steps=1, keep=1,
                                       use_async=False)
  checkpointer.save(step, state, dict(seed=config.seed, next_step=step), force=True)
  checkpointer.close()
  with open(workdir / 'config.json', 'w') as f:
    f.write(config.to_json_best_effort(indent=2))
  return state


@pytest.fixture
def write_run():
  """write_pretraining_run, for tests that change the config first."""
  return write_pretraining_run


@pytest.fixture
def pretraining_run(tiny_config, tmp_path):
  workdir = tmp_path / 'run'
  workdir.mkdir()
  state = write_pretraining_run(tiny_config, workdir)
  return workdir, state


@pytest.fixture
def resnet_run(tmp_path):
  """A MoCo v3 ResNet-18 run (1/8 width, small stem) whose BN statistics are not the init's
  (a probe that ran BN in training mode, or wrote to it, would change them)."""
  from configs import common
  c = common.fashion_mnist(common.mocov3_resnet(18))
  c.model.width, c.model.small_stem = 0.125, True
  c.head.hidden_dim, c.head.out_dim = 64, 32
  c.batch_size, c.plot = 32, False
  workdir = tmp_path / 'resnet_run'
  workdir.mkdir()
  state = write_pretraining_run(c, workdir, random_values=True)
  return workdir, state


def toy_images(n: int, seed: int, size: int = 28):
  """Three classes a random ViT tells apart, robust to crops and horizontal flips:
  horizontal stripes, vertical stripes, checkerboard (random phase and period, plus noise)."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 3, n)
  yy, xx = np.meshgrid(np.arange(size), np.arange(size), indexing='ij')
  images = np.empty((n, size, size, 1), np.uint8)
  for i, c in enumerate(labels):
    period = rng.integers(3, 6)
    phase = rng.integers(0, period)
    rows = ((yy + phase) // period) % 2
    cols = ((xx + phase) // period) % 2
    pattern = (rows, cols, rows ^ cols)[c]
    noisy = 60 + 140 * pattern + rng.normal(0, 20, (size, size))
    images[i, ..., 0] = np.clip(noisy, 0, 255).astype(np.uint8)
  return images, labels


@pytest.fixture(scope='session')
def toy_sources():
  train_images, train_labels = toy_images(384, seed=0)
  eval_images, eval_labels = toy_images(200, seed=1)
  return (Source.from_arrays(train_images, train_labels, name='toy/train', num_classes=3),
          Source.from_arrays(eval_images, eval_labels, name='toy/eval', num_classes=3))
