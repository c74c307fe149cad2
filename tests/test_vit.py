"""ViT: the sin-cos table, the initialisation rules, pooling variants, shapes."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mocojax.models import vit as vit_lib


def test_sincos_table_matches_direct_formula():
  gh, gw, width = 3, 5, 16
  table = vit_lib.sincos2d_position_embedding(gh, gw, width)
  assert table.shape == (gh * gw, width)
  q = width // 4
  for y in range(gh):
    for x in range(gw):
      row = table[y * gw + x]  # row-major patch order
      for d in range(q):
        w = 1.0 / 10000 ** (d / q)
        np.testing.assert_allclose(row[d], math.sin(y * w), atol=1e-6)
        np.testing.assert_allclose(row[q + d], math.cos(y * w), atol=1e-6)
        np.testing.assert_allclose(row[2 * q + d], math.sin(x * w), atol=1e-6)
        np.testing.assert_allclose(row[3 * q + d], math.cos(x * w), atol=1e-6)


def _init(model, size=28, channels=3, seed=0):
  x = jnp.zeros((2, size, size, channels))
  return model.init(jax.random.key(seed), x)['params']


def test_sincos_is_fixed_and_cls_gets_none():
  model = vit_lib.ViT(width=32, depth=1, num_heads=2, patch_size=7, posemb='sincos2d')
  params = _init(model)
  assert 'pos_embed' not in params  # fixed: not a parameter, so never trained or decayed
  # The tokens entering the first block are patch_i @ W + b + pos_i, and [CLS] has no pos.
  images = jax.random.normal(jax.random.key(1), (1, 28, 28, 3))
  pe = vit_lib.PatchEmbed(7, 32)
  patches = pe.apply({'params': params['patch_embed']}, images)
  table = vit_lib.sincos2d_position_embedding(4, 4, 32)
  tokens_in = _tokens_before_blocks(model, params, images)
  np.testing.assert_allclose(tokens_in[0, 1:], patches[0] + table, atol=1e-5)
  np.testing.assert_allclose(tokens_in[0, 0], params['cls_token'][0, 0], atol=1e-7)


def _tokens_before_blocks(model, params, images):
  # Interception of blocks_0's input: the token sequence after embeddings.
  seen = {}

  def grab(next_fun, args, kwargs, context):
    if context.module.name == 'blocks_0' and context.method_name == '__call__':
      seen['x'] = args[0]
    return next_fun(*args, **kwargs)

  import flax.linen as nn
  with nn.intercept_methods(grab):
    model.apply({'params': params}, images)
  return seen['x']


def _uniform_limit_ok(w, limit):
  w = np.asarray(w)
  assert np.abs(w).max() <= limit * (1 + 1e-6)
  assert np.abs(w).max() > 0.97 * limit
  # U(-a, a) has variance a^2 / 3.
  np.testing.assert_allclose(w.var(), limit**2 / 3, rtol=0.08)


def test_initialisation_rules():
  d, p, c = 96, 8, 3
  model = vit_lib.ViT(width=d, depth=2, num_heads=4, patch_size=p)
  params = _init(model, size=32, channels=c)
  blk = params['blocks_0']
  # qkv: three separate D x D xavier blocks, so the limit uses fan_out D, not 3D.
  qkv = np.asarray(blk['attn']['qkv']['kernel'])
  assert qkv.shape == (d, 3 * d)
  for i in range(3):
    _uniform_limit_ok(qkv[:, i * d:(i + 1) * d], math.sqrt(6 / (d + d)))
  _uniform_limit_ok(blk['attn']['proj']['kernel'], math.sqrt(6 / (d + d)))
  _uniform_limit_ok(blk['fc1']['kernel'], math.sqrt(6 / (d + 4 * d)))
  _uniform_limit_ok(blk['fc2']['kernel'], math.sqrt(6 / (4 * d + d)))
  for name in ('qkv', 'proj'):
    assert not np.any(blk['attn'][name]['bias'])
  assert not np.any(blk['fc1']['bias']) and not np.any(blk['fc2']['bias'])
  # Patch projection: a linear map with fan-in C*p*p.
  _uniform_limit_ok(params['patch_embed']['kernel'], math.sqrt(6 / (c * p * p + d)))
  assert not np.any(params['patch_embed']['bias'])
  cls = np.asarray(params['cls_token'])
  assert 0.5e-6 < cls.std() < 1.5e-6
  np.testing.assert_array_equal(blk['norm1']['scale'], 1.0)
  np.testing.assert_array_equal(blk['norm1']['bias'], 0.0)


@pytest.mark.parametrize('pool,gap_norm', [('cls', True), ('gap', True), ('gap', False)])
def test_pooling_variants(pool, gap_norm):
  model = vit_lib.ViT(width=32, depth=1, num_heads=2, patch_size=7, pool=pool, gap_norm=gap_norm)
  params = _init(model)
  images = jax.random.normal(jax.random.key(2), (3, 28, 28, 3))
  out = model.apply({'params': params}, images)
  assert out.shape == (3, 32)
  assert ('norm' in params) == (pool == 'cls')
  assert ('fc_norm' in params) == (pool == 'gap' and gap_norm)
  if pool == 'cls' or gap_norm:  # a LayerNorm output has zero mean, unit variance per row
    np.testing.assert_allclose(out.mean(-1), 0, atol=1e-5)


def test_sizes_and_any_channels():
  assert vit_lib.SIZES['small'] == (384, 12, 12)
  model = vit_lib.vit('custom', width=48, depth=1, num_heads=3, patch_size=4)
  out = model.apply({'params': _init(model, size=12, channels=1)}, jnp.ones((2, 12, 12, 1)))
  assert out.shape == (2, 48)
  with pytest.raises(ValueError, match='model.variant'):
    vit_lib.vit('gigantic')
  with pytest.raises(ValueError, match='patch_size'):
    _init(vit_lib.ViT(width=32, depth=1, num_heads=2, patch_size=5))


def test_learned_and_no_position_embedding():
  learned = _init(vit_lib.ViT(width=32, depth=1, num_heads=2, patch_size=7, posemb='learned'))
  assert learned['pos_embed'].shape == (16, 32)
  none = _init(vit_lib.ViT(width=32, depth=1, num_heads=2, patch_size=7, posemb='none'))
  assert 'pos_embed' not in none
