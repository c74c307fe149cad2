"""Export: backbone only, identical features after loading, strict loading, position-embedding
resampling, and the safetensors file under timm's names, shapes and layouts."""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from safetensors import safe_open

from mocojax import step as step_lib
from mocojax.hand_off import encoder
from mocojax.models import vit as vit_lib

KEYS_FILE = os.path.join(os.path.dirname(__file__), '..', 'data',
                         'timm_vit_small_patch16_224_keys.txt')


def _images(n=4, size=28, seed=0):
  return jax.random.normal(jax.random.key(seed), (n, size, size, 1))


def test_export_then_load_gives_identical_features(pretraining_run, tiny_config, tmp_path):
  workdir, saved = pretraining_run
  out = tmp_path / 'encoder'
  info = encoder.export_encoder(str(workdir), str(out))
  assert info['source']['step'] == 7 and info['feature_dim'] == 32
  # Backbone only: no projector/predictor, no momentum encoder, no optimizer state.
  on_disk = json.load(open(out / 'model.json'))
  assert on_disk['files'] == {'orbax': 'variables'}
  module, variables = encoder.load_encoder(str(out))
  assert set(variables) == {'params'}
  assert set(variables['params']) == set(saved.params['backbone'])

  x = _images()
  method, _, _, _ = step_lib.build(tiny_config, steps_per_epoch=10, channels=1)
  reference = jax.jit(method.features)({'params': saved.params, 'batch_stats': saved.batch_stats},
                                       x)
  loaded = jax.jit(lambda v, x: module.apply(v, x, train=False))(variables, x)
  np.testing.assert_array_equal(np.asarray(loaded), np.asarray(reference))


def _rewrite_model(out, **changes):
  info = json.load(open(out / 'model.json'))
  info['model'].update(changes)
  json.dump(info, open(out / 'model.json', 'w'))


def test_strict_load_names_mismatched_keys(pretraining_run, tmp_path):
  workdir, _ = pretraining_run
  out = tmp_path / 'encoder'
  encoder.export_encoder(str(workdir), str(out))
  _rewrite_model(out, depth=3)
  with pytest.raises(ValueError, match=r'missing from the checkpoint \(12\): params/blocks_2/'):
    encoder.load_encoder(str(out))
  _rewrite_model(out, depth=1)
  with pytest.raises(ValueError, match=r'unexpected in the checkpoint \(\d+\): params/blocks_1/'):
    encoder.load_encoder(str(out))
  _rewrite_model(out, depth=2, variant='custom', width=64)
  with pytest.raises(ValueError, match=r'shape mismatch \(29\): params/blocks_0/attn/proj/bias: '
                     r'checkpoint \(32,\), model \(64,\);.* and 9 more'):
    encoder.load_encoder(str(out))


def test_learned_position_embedding_is_resampled(tiny_config, write_run, tmp_path):
  tiny_config.model.posemb = 'learned'
  workdir = tmp_path / 'run'
  workdir.mkdir()
  write_run(tiny_config, workdir)
  out = tmp_path / 'encoder'
  encoder.export_encoder(str(workdir), str(out))
  module, same = encoder.load_encoder(str(out))
  assert same['params']['pos_embed'].shape == (16, 32)   # 28 px / patch 7 = 4x4
  module, bigger = encoder.load_encoder(str(out), image_size=42)
  assert bigger['params']['pos_embed'].shape == (36, 32)  # 6x6
  assert module.apply(bigger, _images(size=42), train=False).shape == (4, 32)
  # Everything but the table is untouched; a constant table stays constant.
  np.testing.assert_array_equal(bigger['params']['cls_token'], same['params']['cls_token'])
  const = vit_lib.resample_position_embedding(jnp.ones((16, 8)), (4, 4), (6, 6))
  np.testing.assert_allclose(const, 1.0, rtol=1e-6)
  with pytest.raises(ValueError, match='divisible'):
    encoder.load_encoder(str(out), image_size=30)


def test_sincos_encoder_loads_at_another_size(pretraining_run, tmp_path):
  workdir, _ = pretraining_run
  out = tmp_path / 'encoder'
  encoder.export_encoder(str(workdir), str(out))
  module, variables = encoder.load_encoder(str(out), image_size=56)
  assert 'pos_embed' not in variables['params']  # recomputed by the module at any size
  assert module.apply(variables, _images(size=56), train=False).shape == (4, 32)


def _timm_key_list():
  rows = [line.split() for line in open(KEYS_FILE) if line.strip() and not line.startswith('#')]
  return {name: tuple(int(d) for d in shape.split(',')) for name, shape in rows}


def test_safetensors_has_timm_names_and_shapes_for_vit_small(tmp_path):
  model = ml_collections.ConfigDict(dict(name='vit', variant='small', patch_size=16))
  module = vit_lib.vit('small', patch_size=16)
  abstract = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3))))
  variables = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), abstract)  # names, not values
  info = encoder.write_encoder(str(tmp_path), model, variables, image_size=224, channels=3,
                               mean=(0.5,) * 3, std=(0.5,) * 3, formats=('safetensors',))
  with safe_open(str(tmp_path / 'model.safetensors'), framework='numpy') as f:
    found = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    assert f.metadata()['format'] == 'pt'
  expected = _timm_key_list()
  assert len(expected) == 150
  assert sorted(set(expected) - set(found)) == [] and sorted(set(found) - set(expected)) == []
  assert {k: v for k, v in found.items() if expected[k] != v} == {}
  # MoCo v3's ViT-S has 12 heads, which the timm kwargs must carry (timm's default is 6).
  assert info['torch']['kwargs']['num_heads'] == 12


# A timm VisionTransformer forward pass written out in numpy on the PyTorch-layout tensors (NCHW
# input, Linear y = x W^T + b, conv weight [D, C, p, p]), in float64.
def _layer_norm(x, sd, name, eps=1e-6):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu)**2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * sd[f'{name}.weight'] + sd[f'{name}.bias']


def _linear(x, sd, name):
  return x @ sd[f'{name}.weight'].T + sd[f'{name}.bias']


def _timm_forward(sd, x_nchw, num_heads, global_pool):
  sd = {k: v.astype(np.float64) for k, v in sd.items()}
  w = sd['patch_embed.proj.weight']
  d, c, p, _ = w.shape
  b, _, h, wd = x_nchw.shape
  patches = x_nchw.reshape(b, c, h // p, p, wd // p, p).transpose(0, 2, 4, 1, 3, 5)
  tokens = patches.reshape(b, -1, c * p * p) @ w.reshape(d, -1).T + sd['patch_embed.proj.bias']
  x = np.concatenate([np.broadcast_to(sd['cls_token'], (b, 1, d)), tokens], 1) + sd['pos_embed']
  erf = np.vectorize(__import__('math').erf)
  i = 0
  while f'blocks.{i}.norm1.weight' in sd:
    n = x.shape[1]
    qkv = _linear(_layer_norm(x, sd, f'blocks.{i}.norm1'), sd, f'blocks.{i}.attn.qkv')
    q, k, v = qkv.reshape(b, n, 3, num_heads, d // num_heads).transpose(2, 0, 3, 1, 4)
    logits = q @ k.transpose(0, 1, 3, 2) * (d // num_heads)**-0.5
    att = np.exp(logits - logits.max(-1, keepdims=True))
    att /= att.sum(-1, keepdims=True)
    out = (att @ v).transpose(0, 2, 1, 3).reshape(b, n, d)
    x = x + _linear(out, sd, f'blocks.{i}.attn.proj')
    y = _linear(_layer_norm(x, sd, f'blocks.{i}.norm2'), sd, f'blocks.{i}.mlp.fc1')
    y = 0.5 * y * (1 + erf(y / np.sqrt(2)))
    x = x + _linear(y, sd, f'blocks.{i}.mlp.fc2')
    i += 1
  if global_pool == 'token':
    return _layer_norm(x, sd, 'norm')[:, 0]
  return _layer_norm(x[:, 1:].mean(1), sd, 'fc_norm')


@pytest.mark.parametrize('posemb,pool', [('sincos2d', 'cls'), ('learned', 'gap')])
def test_safetensors_computes_the_same_features_in_timm_layout(posemb, pool, tmp_path):
  model = ml_collections.ConfigDict(dict(name='vit', variant='custom', width=32, depth=2,
                                         num_heads=4, patch_size=7, posemb=posemb, pool=pool))
  module = vit_lib.vit(**model.to_dict())
  x = _images(n=3, size=28, seed=1)
  variables = jax.jit(module.init)(jax.random.key(3), x)
  # Non-zero biases, LN affine and [CLS], so a wrong name or transpose cannot hide.
  rng = np.random.default_rng(0)
  variables = jax.tree.map(
      lambda a: np.asarray(a) + 0.1 * rng.normal(size=a.shape).astype(np.float32), variables)
  info = encoder.write_encoder(str(tmp_path), model, variables, image_size=28, channels=1,
                               mean=(0.5,), std=(0.5,), formats=('safetensors',))
  with safe_open(str(tmp_path / 'model.safetensors'), framework='numpy') as f:
    sd = {k: f.get_tensor(k) for k in f.keys()}
  kwargs = info['torch']['kwargs']
  theirs = _timm_forward(sd, np.asarray(x, np.float64).transpose(0, 3, 1, 2), kwargs['num_heads'],
                         kwargs['global_pool'])
  ours = jax.jit(lambda v, x: module.apply(v, x, train=False))(variables, x)
  np.testing.assert_allclose(ours, theirs, rtol=2e-4, atol=2e-5)


def test_safetensors_of_a_vit_run(pretraining_run, tmp_path):
  workdir, _ = pretraining_run
  info = encoder.export_encoder(str(workdir), str(tmp_path / 'enc'),
                                formats=('orbax', 'safetensors'))
  assert info['files'] == {'orbax': 'variables', 'safetensors': 'model.safetensors'}
  assert info['torch']['kwargs']['in_chans'] == 1 and info['torch']['kwargs']['img_size'] == 28


def test_resnet_export_keeps_bn_statistics_and_torchvision_names(resnet_run, tmp_path):
  workdir, saved = resnet_run
  out = tmp_path / 'enc'
  info = encoder.export_encoder(str(workdir), str(out), formats=('orbax', 'safetensors'))
  module, variables = encoder.load_encoder(str(out))
  assert set(variables) == {'params', 'batch_stats'}
  x = _images()
  features = jax.jit(lambda v, x: module.apply(v, x, train=False))
  want = features({'params': saved.params['backbone'],
                   'batch_stats': saved.batch_stats['backbone']}, x)
  np.testing.assert_array_equal(np.asarray(features(variables, x)), np.asarray(want))

  assert info['torch']['model'] == 'resnet18' and info['channels'] == 1
  with safe_open(str(out / 'model.safetensors'), framework='numpy') as f:
    shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    mean = f.get_tensor('layer1.0.bn1.running_mean')
  assert shapes['conv1.weight'] == (8, 1, 3, 3)                  # OIHW; small stem, width 1/8
  assert shapes['layer2.0.downsample.0.weight'] == (16, 8, 1, 1)
  assert shapes['layer4.1.bn2.running_var'] == (64,)
  np.testing.assert_array_equal(mean, saved.batch_stats['backbone']['layer1_0']['bn1']['mean'])
  assert not any(k.startswith('fc.') for k in shapes)


def test_a_checkpoint_whose_bytes_changed_is_not_exported(pretraining_run, tmp_path):
  workdir, _ = pretraining_run
  meta_file = workdir / 'checkpoints' / '7' / 'meta' / 'metadata'
  meta = json.load(open(meta_file))
  key = next(k for k in meta['checksums'] if k.startswith('params/backbone/blocks_1/'))
  meta['checksums'][key][0] ^= 1  # as if a byte of that array had flipped on disk
  json.dump(meta, open(meta_file, 'w'))
  with pytest.raises(ValueError, match=f'is damaged .*e.g. {key}.*earlier step of'):
    encoder.export_encoder(str(workdir), str(tmp_path / 'encoder'))
