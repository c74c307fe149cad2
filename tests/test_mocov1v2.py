"""MoCo v1/v2: the queue, the logits and loss against numpy, shuffling BN against an explicit
reference, 1 vs 8 devices, resuming with the queue, and the recipes' configs."""

import functools
import importlib
import json
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import Mesh

from configs import common
from mocojax import methods, optim, parallel, train
from mocojax import step as step_lib
from mocojax.methods import mocov1v2
from mocojax.models import norm

FMNIST = '/usr/share/datasets/fashion-mnist'
KEY = jax.random.key(0, impl='rbg')  # init compiles in ~1 s instead of many with threefry


def _config(version=2, bn_stats='group', shuffle_bn=True, symmetric=False):
  """A 4-channel ResNet-18 on 8x8 images, BN groups of 4, batch 16, queue 64."""
  c = common.fashion_mnist(common.mocov1v2_resnet(version))
  c.model = common.resnet_model(18, width=1 / 16, small_stem=True, bn_stats=bn_stats,
                                bn_group_size=4)
  c.head.out_dim = 8
  c.batch_size, c.queue_size = 16, 64
  c.shuffle_bn, c.symmetric = shuffle_bn, symmetric
  c.data.image_size = 8
  c.plot = False
  return c


def _images(seed, n=16):
  return jax.random.normal(jax.random.key(seed), (n, 8, 8, 1))


@pytest.fixture(scope='module')
def tiny():
  """One init of the tiny encoders, shared: every test config has the same architecture (BN
  statistics, shuffling and symmetry change no variable), and each compile costs seconds.
  Also a jitted encoder with batch-wide BN, the building block of the references below."""
  c = _config(bn_stats='global')
  method = methods.build_method(c)
  v = jax.jit(method.init)(KEY, _images(0, 1))

  @jax.jit
  def encode(params, batch_stats, x):
    out = method.encoder.apply({'params': params, 'batch_stats': batch_stats}, x, train=True,
                               mutable=['batch_stats'])
    return out[0][1]

  return types.SimpleNamespace(v=v, encode=lambda p, bs, x: _np_normalize(encode(p, bs, x)))


@functools.partial(jax.jit, static_argnums=0)
def _loss(method, params, batch_stats, momentum_params, momentum_batch_stats, method_state,
          batch, rng):
  # method.loss reads only these three fields of the train state.
  state = types.SimpleNamespace(batch_stats=batch_stats, momentum_batch_stats=momentum_batch_stats,
                                method_state=method_state)
  return method.loss(params, state, momentum_params, batch, rng)


def _np_normalize(x):
  x = np.asarray(x, np.float64)
  return x / np.linalg.norm(x, axis=1, keepdims=True)


# ---------------------------------------------------------------------------------- the queue
def test_queue_is_a_fifo_whose_pointer_wraps():
  queue, ptr = jnp.zeros((8, 3)), jnp.zeros((), jnp.int32)
  enqueue = jax.jit(mocov1v2.enqueue)
  pointers = []
  for step in range(7):  # keys 2*step and 2*step + 1, their value their insertion number
    keys = jnp.repeat(jnp.arange(2 * step, 2 * step + 2, dtype=jnp.float32)[:, None], 3, 1)
    queue, ptr = enqueue(queue, ptr, keys)
    pointers.append(int(ptr))
  assert pointers == [2, 4, 6, 0, 2, 4, 6]
  # Read from the pointer (the oldest key) around the ring: the last 8 keys in insertion order.
  order = np.roll(np.asarray(queue)[:, 0], -int(ptr))
  np.testing.assert_array_equal(order, np.arange(6, 14))
  with pytest.raises(ValueError, match='queue_size=8'):
    mocov1v2.enqueue(queue, ptr, jnp.zeros((3, 3)))


def test_queue_size_and_bn_groups_are_checked_before_compiling():
  c = _config()
  c.queue_size = 72
  with pytest.raises(ValueError, match=r'queue_size=72 .*batch_size=16.*queue_size=64'):
    methods.build_method(c)
  with pytest.raises(ValueError, match='queue_size=72'):
    step_lib.build(c, steps_per_epoch=10, channels=1)
  c = _config(symmetric=True)
  c.queue_size = 48  # a multiple of 16 but not of the 32 keys a symmetric step enqueues
  with pytest.raises(ValueError, match='queue_size=48.*2 x batch_size=16'):
    methods.build_method(c)
  c = _config()
  c.model.bn_group_size = 5
  with pytest.raises(ValueError, match='bn_group_size=5'):
    methods.build_method(c)


def test_initial_queue_is_normalised_random_keys(tiny):
  v = tiny.v
  queue, ptr = v['method_state']['queue'], v['method_state']['ptr']
  assert queue.shape == (64, 8) and int(ptr) == 0
  np.testing.assert_allclose(np.linalg.norm(queue, axis=1), 1.0, rtol=1e-5)
  assert np.linalg.matrix_rank(np.asarray(queue)) == 8
  assert set(v['params']) == {'backbone', 'head'} == set(v['momentum_params'])


# ------------------------------------------------------------------------ the loss and logits
@pytest.mark.parametrize('symmetric', [False, True])
def test_logits_loss_accuracy_and_enqueue_match_numpy(tiny, symmetric):
  # Global BN and no shuffle here, so q and k are plain encoder outputs; shuffling is below.
  c = _config(bn_stats='global', shuffle_bn=False, symmetric=symmetric)
  method = methods.build_method(c)
  x1, x2 = _images(1), _images(2)
  v = tiny.v
  mparams = jax.tree.map(lambda p: p * 0.9, v['momentum_params'])  # keys != queries
  queue = np.asarray(mocov1v2.init_queue(jax.random.key(5), 64, 8))
  ptr = 32 if symmetric else 48  # the next write ends exactly at the end of the queue
  method_state = dict(queue=jnp.asarray(queue), ptr=jnp.asarray(ptr, jnp.int32))
  loss, aux = _loss(method, v['params'], v['batch_stats'], mparams, v['momentum_batch_stats'],
                    method_state, {'view1': x1, 'view2': x2}, jax.random.key(0))
  q1, q2 = (tiny.encode(v['params'], v['batch_stats'], x) for x in (x1, x2))
  k1, k2 = (tiny.encode(mparams, v['momentum_batch_stats'], x) for x in (x1, x2))

  def ce_and_logits(q, k):
    logits = np.concatenate([np.sum(q * k, 1, keepdims=True), q @ queue.T], 1) / c.temperature
    ce = [np.log(np.sum(np.exp(row))) - row[0] for row in logits]  # label 0 = the positive
    return np.mean(ce), logits

  want, logits = ce_and_logits(q1, k2)
  keys = k2
  if symmetric:
    want21, logits21 = ce_and_logits(q2, k1)
    want, logits, keys = want + want21, np.concatenate([logits, logits21]), np.concatenate([k1, k2])
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)
  assert logits.shape[1] == 1 + 64
  rank = np.sum(logits[:, 1:] > logits[:, :1], 1)
  for k in (1, 5):
    np.testing.assert_allclose(aux['metrics'][f'instance_acc/top{k}'], np.mean(rank < k))
  # The step's keys (view1's first when symmetric) overwrite the queue at the old pointer.
  new_queue = queue.copy()
  new_queue[ptr:ptr + len(keys)] = keys
  np.testing.assert_allclose(aux['method_state']['queue'], new_queue, rtol=1e-5, atol=1e-6)
  assert int(aux['method_state']['ptr']) == 0  # wrapped
  assert aux['features'].shape == (16, 32)


# --------------------------------------------------------------------------------- BN groups
def _per_group_reference(tiny, params, batch_stats, x):
  """Each group of 4 consecutive samples through the encoder alone, with batch-wide BN."""
  return np.concatenate([tiny.encode(params, batch_stats, g) for g in np.split(x, len(x) // 4)])


def test_key_features_under_shuffling_bn_equal_the_explicit_reference(tiny):
  method = methods.build_method(_config())
  x = np.asarray(_images(3))
  v = tiny.v
  rng = jax.random.key(7)
  keys, _ = jax.jit(method.keys)(v['momentum_params'], v['momentum_batch_stats'], x, rng)

  # Permute with the same permutation -> groups of 4 -> normalise each -> un-permute.
  perm = np.asarray(norm.shuffle(rng, jnp.arange(16))[0])
  assert not np.array_equal(perm, np.arange(16))
  want = np.empty((16, 8))
  want[perm] = _per_group_reference(tiny, v['momentum_params'], v['momentum_batch_stats'], x[perm])
  np.testing.assert_allclose(keys, want, rtol=1e-4, atol=1e-5)
  # Without the shuffle each key would see other group mates: the shuffle matters.
  unshuffled = _per_group_reference(tiny, v['momentum_params'], v['momentum_batch_stats'], x)
  assert not np.allclose(keys, unshuffled, atol=1e-3)


def test_query_bn_groups_are_consecutive_samples_not_permuted(tiny):
  method = methods.build_method(_config())
  x = np.asarray(_images(4))
  v = tiny.v
  _, q, _ = jax.jit(method.query)(v['params'], v['batch_stats'], x)
  want = _per_group_reference(tiny, v['params'], v['batch_stats'], x)
  np.testing.assert_allclose(q, want, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- 1 vs 8 devices
def _steps_on_mesh(config, devices, state, batch, steps=2):
  mesh = Mesh(np.array(devices), ('data',))
  _, step_fn, _, _ = step_lib.build(config, steps_per_epoch=10, channels=1)
  rep, data = parallel.replicated(mesh), parallel.batch_sharding(mesh)
  state, batch = jax.device_put(state, rep), jax.device_put(batch, data)
  step = jax.jit(step_fn, in_shardings=(rep, data), out_shardings=(rep, rep))
  metrics = []
  for _ in range(steps):
    state, m = step(state, batch)
    metrics.append(jax.device_get(m))
  return jax.device_get(state), metrics


def test_eight_devices_equal_one_device():
  if jax.device_count() < 8:
    pytest.skip('needs 8 devices: XLA_FLAGS=--xla_force_host_platform_device_count=8')
  c = _config(version=1)
  c.batch_size, c.queue_size, c.model.bn_group_size = 32, 64, 8  # a BN group spans 2 devices
  batch = {'view1': np.asarray(_images(1, 32)), 'view2': np.asarray(_images(2, 32))}
  _, _, init_fn, _ = step_lib.build(c, steps_per_epoch=10, channels=1)
  state = jax.device_get(jax.jit(init_fn)(KEY, jnp.zeros((1, 8, 8, 1))))  # one init for both
  s1, m1 = _steps_on_mesh(c, jax.devices()[:1], state, batch)
  s8, m8 = _steps_on_mesh(c, jax.devices()[:8], state, batch)
  for a, b in zip(m1, m8):
    for k in ('loss', 'instance_acc/top1', 'instance_acc/top5'):
      np.testing.assert_allclose(a[k], b[k], rtol=1e-5, err_msg=k)
    # Summed over all parameters, the gradient norm collects more rounding.
    np.testing.assert_allclose(a['grad_norm'], b['grad_norm'], rtol=1e-4)
  # Unit-norm keys: agreement to 1e-5 absolute.
  np.testing.assert_allclose(s1.method_state['queue'], s8.method_state['queue'], atol=1e-5)
  assert int(s1.method_state['ptr']) == int(s8.method_state['ptr']) == 0  # 2 x 32 keys of 64
  for tree in ('params', 'batch_stats', 'momentum_batch_stats'):
    for x, y in zip(jax.tree.leaves(getattr(s1, tree)), jax.tree.leaves(getattr(s8, tree))):
      np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5, err_msg=tree)


# ------------------------------------------------------------------------------------ resume
@pytest.mark.skipif(not os.path.exists(os.path.join(FMNIST, 'train-images-idx3-ubyte.gz')),
                    reason='Fashion-MNIST IDX files absent: apt-get install dataset-fashion-mnist')
@pytest.mark.filterwarnings('ignore:Sharding info not provided')  # raw restore, for reading only
def test_resumed_v1_run_restores_queue_and_pointer(tmp_path):
  c = _config(version=1)
  c.total_steps, c.log_every_steps, c.checkpoint_every_steps = 3, 1, 100  # saves at 2 and 3
  c.eval.knn_every_epochs, c.eval.knn_at_end = 0, False
  c.async_checkpointing = False
  if c.get('online_probe'):
    c.online_probe.enabled = False

  def method_state(step):
    path = os.path.join(tmp_path, 'checkpoints', str(step), 'state')
    return ocp.PyTreeCheckpointer().restore(path)['method_state']

  with jax.default_prng_impl('rbg'):  # see KEY
    run_c = c.copy_and_resolve_references()
    run_c.stop_after_steps = 2
    train.train_and_evaluate(run_c, str(tmp_path))      # "preempted" after step 2
    before = method_state(2)
    train.train_and_evaluate(c, str(tmp_path))          # the same command again: step 3
  after = method_state(3)
  with open(os.path.join(tmp_path, 'metrics.jsonl')) as f:
    assert [r['step'] for r in map(json.loads, f) if 'loss' in r] == [1, 2, 3]
  # Two steps of 16 keys went in at rows 0-31; the resumed step wrote rows 32-47, at the
  # restored pointer, and left every other row of the restored queue exactly as it was.
  assert int(before['ptr']) == 32 and int(after['ptr']) == 48
  np.testing.assert_array_equal(after['queue'][:32], before['queue'][:32])
  np.testing.assert_array_equal(after['queue'][48:], before['queue'][48:])
  assert not np.any(np.isclose(after['queue'][32:48], before['queue'][32:48]))
  np.testing.assert_allclose(np.linalg.norm(after['queue'][32:48], axis=1), 1.0, rtol=1e-5)


# ----------------------------------------------------------------------------------- recipes
RECIPES = ('mocov1_resnet50', 'mocov2_resnet50', 'mocov2_resnet50_800ep', 'mocov3_resnet50',
           'mocov3_resnet50_300ep', 'mocov3_resnet50_1000ep', 'demo_mocov1', 'demo_mocov2',
           'demo_mocov3_resnet')


@pytest.mark.parametrize('name', RECIPES)
def test_recipe_configs(name):
  c = importlib.import_module(f'configs.{name}').get_config()
  train.check_config(c)
  method = methods.build_method(c)
  size = c.data.image_size if name.startswith('demo') else 32  # shapes only; 32 px is enough
  channels = 1 if name.startswith('demo') else 3
  v = jax.eval_shape(lambda: method.init(jax.random.key(0), jnp.zeros((1, size, size, channels))))
  if c.method in ('mocov1', 'mocov2'):
    assert c.queue_size % c.batch_size == 0 and c.momentum.cosine is False
    assert v['method_state']['queue'].shape == (c.queue_size, 128)
    head = v['params']['head']
    assert (sorted(head) == ['fc_0', 'fc_2']) == (c.method == 'mocov2')
  want = {
      'mocov1_resnet50': dict(batch_size=256, epochs=200, temperature=0.07, base_lr=0.03,
                              weight_decay=1e-4, momentum=0.999, recipe='mocov1'),
      'mocov2_resnet50': dict(batch_size=256, epochs=200, temperature=0.2, base_lr=0.03,
                              weight_decay=1e-4, momentum=0.999, recipe='mocov2'),
      'mocov2_resnet50_800ep': dict(epochs=800, temperature=0.2, recipe='mocov2'),
      'mocov3_resnet50': dict(batch_size=4096, epochs=100, temperature=1.0, base_lr=0.6,
                              weight_decay=1e-6, momentum=0.99, recipe='mocov3'),
      'mocov3_resnet50_300ep': dict(epochs=300, base_lr=0.3, weight_decay=1e-6, momentum=0.99),
      'mocov3_resnet50_1000ep': dict(epochs=1000, base_lr=0.3, weight_decay=1.5e-6,
                                     momentum=0.996),
  }.get(name, {})
  got = dict(batch_size=c.batch_size, epochs=c.epochs, temperature=c.temperature,
             base_lr=c.optimizer.base_lr, weight_decay=c.optimizer.weight_decay,
             momentum=c.momentum.base, recipe=c.data.recipe)
  assert {k: got[k] for k in want} == want
  if not name.startswith('demo'):
    assert tuple(c.data.crop_scale) == (0.2, 1.0) and c.model.depth == 50


def test_v1_lr_steps_and_v2_cosine():
  c = common.mocov1v2_resnet(1)
  lr = optim.learning_rate_schedule(c, steps_per_epoch=10)
  for epoch, want in ((0, 0.03), (119.9, 0.03), (120, 0.003), (159.9, 0.003), (160, 0.0003)):
    np.testing.assert_allclose(float(lr(int(epoch * 10))), want, rtol=1e-6, err_msg=str(epoch))
  c = common.mocov1v2_resnet(2)
  lr = optim.learning_rate_schedule(c, steps_per_epoch=10)
  np.testing.assert_allclose([float(lr(0)), float(lr(1000)), float(lr(2000))],
                             [0.03, 0.015, 0.0], atol=1e-7)
