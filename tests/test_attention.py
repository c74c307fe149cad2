"""The ViT's attention implementations (model.attention) and the softmax that keeps its output
in the compute dtype (model.softmax_residual): each equals the reference einsum path.

cuDNN's kernel cannot run on a CPU; the cuDNN path is `padded_attention(..., 'cudnn')`, so its
padding and masking are tested here with the XLA kernel, the only argument that differs.
"""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mocojax import validate
from mocojax.models import vit as vit_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _close(actual, reference, rtol, what=''):
  """Equal to `rtol` relative to the reference's scale (elementwise relative error is
  meaningless for the entries that are nearly zero)."""
  actual, reference = np.asarray(actual, np.float64), np.asarray(reference, np.float64)
  np.testing.assert_allclose(actual, reference, rtol=rtol,
                             atol=rtol * np.abs(reference).max(), err_msg=what)


def _normal(seed, shape, dtype=jnp.float32):
  return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def _value_and_vjp(f, *args):
  """f(*args) and the vjp of a cotangent: one compiled program (eager op-by-op is slow)."""
  return jax.jit(lambda args, cotangent: (lambda out, vjp: (out, vjp(cotangent)))(
      *jax.vjp(f, *args)))


def _kept(f, *args) -> list:
  """The arrays jax.vjp keeps for f's backward, as ShapeDtypeStructs (traced, not run)."""
  return jax.tree.leaves(jax.eval_shape(lambda *a: jax.vjp(f, *a)[1], *args))


# ----------------------------------------------------------------------------------------------
# The softmax.
# ----------------------------------------------------------------------------------------------
def test_softmax_keeping_output_equals_jax_softmax_in_float32():
  logits, cotangent = 3 * _normal(0, (2, 3, 5, 7)), _normal(1, (2, 3, 5, 7))
  plain = lambda x: jax.nn.softmax(x, axis=-1)
  kept = lambda x: vit_lib.softmax_keeping_output(x, jnp.float32)
  y_ref, (grad_ref,) = _value_and_vjp(plain, logits)((logits,), cotangent)
  y, (grad,) = _value_and_vjp(kept, logits)((logits,), cotangent)
  np.testing.assert_array_equal(y, y_ref)
  _close(grad, grad_ref, 1e-6)


def test_softmax_keeps_its_bf16_output_not_float32_probabilities():
  logits = (3 * _normal(0, (2, 4, 17, 17))).astype(jnp.bfloat16)
  cotangent = _normal(1, (2, 4, 17, 17), jnp.bfloat16)
  plain = lambda x: jax.nn.softmax(x.astype(jnp.float32), axis=-1).astype(jnp.bfloat16)
  kept = lambda x: vit_lib.softmax_keeping_output(x, jnp.bfloat16)

  residuals = lambda f: [(x.dtype, x.shape) for x in _kept(f, logits)]
  assert (jnp.dtype(jnp.float32), logits.shape) in residuals(plain)   # what autodiff keeps
  assert residuals(kept) == [(jnp.dtype(jnp.bfloat16), logits.shape)]  # only the bf16 output
  y_ref, (grad_ref,) = _value_and_vjp(plain, logits)((logits,), cotangent)
  y, (grad,) = _value_and_vjp(kept, logits)((logits,), cotangent)
  np.testing.assert_array_equal(y, y_ref)
  # The backward differs only by y rounded to bf16.
  _close(grad, grad_ref, 2e-2)


# ----------------------------------------------------------------------------------------------
# The attention functions.
# ----------------------------------------------------------------------------------------------
# (The einsum path with the compute-dtype softmax is tested in the ViT below.)
_FAST_PATHS = {
    'xla': lambda q, k, v: jax.nn.dot_product_attention(q, k, v, scale=q.shape[-1]**-0.5,
                                                        implementation='xla'),
    # 17 tokens padded to 64 as for cuDNN, the real length as the mask.
    'padded as for cudnn': lambda q, k, v: vit_lib.padded_attention(q, k, v, 'xla'),
}


@pytest.mark.parametrize('path', list(_FAST_PATHS))
def test_attention_equals_the_einsum_reference(path):
  q, k, v = (_normal(i, (2, 17, 4, 16)) for i in range(3))
  cotangent = _normal(3, (2, 17, 4, 16))
  reference = lambda q, k, v: vit_lib.einsum_attention(q, k, v, 'float32')
  out_ref, grads_ref = _value_and_vjp(reference, q, k, v)((q, k, v), cotangent)
  out, grads = _value_and_vjp(_FAST_PATHS[path], q, k, v)((q, k, v), cotangent)
  assert out.shape == out_ref.shape
  _close(out, out_ref, 1e-5)
  for grad, grad_ref, name in zip(grads, grads_ref, 'qkv'):
    _close(grad, grad_ref, 1e-5, f'd{name}')


def test_auto_picks_cudnn_only_on_gpus_in_half_precision():
  pick = vit_lib.attention_implementation
  assert pick('auto', jnp.bfloat16, 64, backend='gpu') == 'cudnn'
  assert pick('auto', jnp.float16, 32, backend='gpu') == 'cudnn'
  assert pick('auto', jnp.float32, 64, backend='gpu') == 'einsum'
  assert pick('auto', jnp.bfloat16, 64, backend='cpu') == 'einsum'
  assert pick('auto', jnp.bfloat16, 64, backend='tpu') == 'einsum'
  assert pick('auto', jnp.bfloat16, 12, backend='gpu') == 'einsum'   # head dim not a multiple of 8
  assert pick('xla', jnp.float32, 12, backend='gpu') == 'xla'
  with pytest.raises(ValueError, match=r"model.attention='flash' is unknown; use one of"):
    pick('flash', jnp.float32, 64)


# ----------------------------------------------------------------------------------------------
# A small ViT: 32 px, patch 8, so 16 patches + [CLS] = 17 tokens.
# ----------------------------------------------------------------------------------------------
def _vit(**kwargs):
  return vit_lib.ViT(width=64, depth=2, num_heads=4, patch_size=8, **kwargs)


@pytest.fixture(scope='module')
def vit_reference():
  model = _vit(attention='einsum', softmax_residual='float32')
  images = _normal(0, (2, 32, 32, 3))
  params = jax.jit(model.init)(jax.random.key(1), images)['params']
  weights = _normal(2, (2, 64))
  return images, params, weights, _loss_and_grads(model, params, images, weights)


def _loss_and_grads(model, params, images, weights):
  loss = lambda p: jnp.sum(model.apply({'params': p}, images) * weights)
  return jax.jit(jax.value_and_grad(loss))(params)


# ('auto' is 'einsum' with the compute-dtype softmax on a CPU.)
VIT_PATHS = [dict(attention='einsum', softmax_residual='compute'), dict(attention='xla'),
             dict(attention='cudnn')]


@pytest.mark.parametrize('settings', VIT_PATHS, ids=lambda s: ','.join(s.values()))
def test_vit_loss_and_gradients_equal_the_reference(settings, vit_reference, monkeypatch):
  images, params, weights, (loss_ref, grads_ref) = vit_reference
  # The cuDNN path with the XLA kernel: the same padding to 64 tokens and the same lengths.
  unpatched = vit_lib.padded_attention
  monkeypatch.setattr(vit_lib, 'padded_attention',
                      lambda q, k, v, implementation: unpatched(q, k, v, 'xla'))
  model = _vit(**settings)
  # Same parameter tree whatever the attention: exports and checkpoints are untouched.
  tree = jax.eval_shape(model.init, jax.random.key(1), images)['params']
  assert jax.tree.map(lambda x: x.shape, tree) == jax.tree.map(lambda x: x.shape, params)
  assert set(params['blocks_0']['attn']) == {'qkv', 'proj'}
  loss, grads = _loss_and_grads(model, params, images, weights)
  _close(loss, loss_ref, 1e-5)
  for (path, grad), grad_ref in zip(jax.tree_util.tree_leaves_with_path(grads),
                                    jax.tree.leaves(grads_ref)):
    _close(grad, grad_ref, 1e-5, jax.tree_util.keystr(path))


# ----------------------------------------------------------------------------------------------
# The momentum encoder's forward keeps nothing for the backward.
# ----------------------------------------------------------------------------------------------
def test_momentum_encoder_forward_keeps_no_residuals(tiny_config):
  """The step differentiates the method's loss in the base parameters only; the momentum
  encoder's activations must not be kept for the backward. Compare what the loss's vjp keeps
  with what the base encoder's forward alone keeps: the momentum encoder (backbone and
  projector) would double it if kept: 9.1 MB against 4.7 MB for this tiny model."""
  from mocojax import step as step_lib
  from mocojax.methods.base import apply_train
  method, _, init_fn, _ = step_lib.build(tiny_config, steps_per_epoch=10, channels=1)
  state = jax.eval_shape(init_fn, jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
  batch = dict(view1=_normal(1, (16, 28, 28, 1)), view2=_normal(2, (16, 28, 28, 1)))

  def kept_bytes(f):
    """Bytes f's vjp in the parameters keeps; the state goes in abstract, so nothing runs."""
    kept = jax.eval_shape(lambda s: jax.vjp(lambda p: f(p, s), s.params)[1], state)
    return sum(np.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(kept)
               if not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key))

  def base_only(params, s):
    (_, q1), bs = apply_train(method.base, params, s.batch_stats, batch['view1'])
    (_, q2), _ = apply_train(method.base, params, bs, batch['view2'])
    return jnp.sum(q1) + jnp.sum(q2)

  def loss(params, s):
    return method.loss(params, s, s.momentum_params, batch, jax.random.key(3))[0]

  full, base = kept_bytes(loss), kept_bytes(base_only)
  assert full < 1.1 * base, (full, base)


# ----------------------------------------------------------------------------------------------
# The settings.
# ----------------------------------------------------------------------------------------------
def _demo(**model):
  from configs import demo
  c = demo.get_config()
  c.model.update(model)
  return c


@pytest.mark.parametrize('model, dtype, wrong', [
    (dict(attention='flash'), 'float32', "config.model.attention='flash' is unknown; use one of "
     "('auto', 'einsum', 'xla', 'cudnn')."),
    (dict(softmax_residual='bf16'), 'float32', "config.model.softmax_residual='bf16' is unknown; "
     "use one of ('compute', 'float32')."),
    (dict(attention='cudnn'), 'float32', "config.model.attention='cudnn' needs config.dtype"),
])
def test_bad_attention_settings_fail_before_compiling(model, dtype, wrong):
  c = _demo(**model)
  c.dtype = dtype
  with pytest.raises(validate.ConfigError) as err:
    validate.check(c)
  assert str(err.value).startswith(wrong) and len(str(err.value).splitlines()) == 1


def test_good_attention_settings_pass():
  for attention in vit_lib.ATTENTION:
    c = _demo(attention=attention, softmax_residual='float32')
    c.dtype = 'bfloat16'
    validate.check(c)


def test_step_bench_sets_a_lever_and_checks_it_before_compiling():
  out = subprocess.run(
      [sys.executable, os.path.join(ROOT, 'bench', 'train_step.py'), '--models=demo',
       '--compile_only', '--set=model.remat=True,model.attention=flash'],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert out.returncode != 0
  assert "config.model.attention='flash' is unknown; use one of" in out.stderr, out.stderr[-2000:]
  assert 'lower / compile' not in out.stdout
