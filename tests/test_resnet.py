"""ResNets: torchvision's sizes, names, v1.5 strides and init; the small stem and width; the v3
ResNet-50 heads. Shape checks use jax.eval_shape, so nothing big is compiled."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from mocojax.methods import mocov3
from mocojax.models import norm, resnet


def _shapes(model, size=224, channels=3):
  return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, channels))))


def _init(model, x):
  # jit + the 'rbg' generator: an eager or threefry init compiles for seconds on a shared CPU.
  return jax.jit(model.init)(jax.random.key(0, impl='rbg'), x)


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def test_resnet50_matches_torchvision_count_and_names():
  v = _shapes(resnet.resnet(depth=50))
  # torchvision's resnet50 has 25,557,032 parameters, 2,049,000 of them in the 1000-way fc.
  assert _count(v['params']) == 23_508_032
  assert _count(v['params']) + 2048 * 1000 + 1000 == 25_557_032
  sd = resnet.torchvision_state_dict(*(jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), v[k])
                                       for k in ('params', 'batch_stats')))
  assert len(sd) == 53 + 53 * 4  # 53 convs; 53 BNs with weight, bias, running mean and var
  want = {'conv1.weight': (64, 3, 7, 7), 'bn1.running_var': (64,),
          'layer1.0.conv1.weight': (64, 64, 1, 1), 'layer1.0.conv3.weight': (256, 64, 1, 1),
          'layer1.0.downsample.0.weight': (256, 64, 1, 1), 'layer1.0.downsample.1.weight': (256,),
          'layer2.0.conv2.weight': (128, 128, 3, 3), 'layer3.5.bn2.bias': (256,),
          'layer4.2.conv3.weight': (2048, 512, 1, 1), 'layer4.2.bn3.running_mean': (2048,)}
  for name, shape in want.items():
    assert sd[name].shape == shape, name
  assert 'layer1.1.downsample.0.weight' not in sd and 'fc.weight' not in sd
  assert resnet.feature_dim(50) == 2048


def test_resnet50_strides_on_the_3x3_conv():
  model = resnet.resnet(depth=50)
  v = _shapes(model)
  _, inter = jax.eval_shape(lambda v: model.apply(v, jnp.zeros((1, 224, 224, 3)),
                                                  capture_intermediates=True,
                                                  mutable=['intermediates']), v)

  def out(*path):
    return functools.reduce(lambda d, k: d[k], path, inter['intermediates'])['__call__'][0].shape

  assert out('conv1') == (1, 112, 112, 64)
  assert out('layer1_0', 'conv1') == (1, 56, 56, 64)         # after the max-pool
  for stage, size in ((2, 28), (3, 14), (4, 7)):
    block = f'layer{stage}_0'
    assert out(block, 'conv1')[1] == 2 * size, block          # 1x1: stride 1
    assert out(block, 'conv2')[1] == size, block              # 3x3: stride 2 (v1.5)
    assert out(block, 'downsample_0')[1] == size, block
  assert inter['intermediates']['__call__'][0].shape == (1, 2048)


@pytest.mark.parametrize('depth,count', [(18, 11_176_512), (34, 21_284_672)])
def test_basic_block_resnets(depth, count):
  v = _shapes(resnet.resnet(depth=depth))
  assert _count(v['params']) == count  # torchvision's, less the fc (512 * 1000 + 1000)
  assert sorted(v['params']['layer1_0']) == ['bn1', 'bn2', 'conv1', 'conv2']
  assert sorted(v['params']['layer2_0']) == ['bn1', 'bn2', 'conv1', 'conv2', 'downsample_0',
                                             'downsample_1']
  assert v['params']['layer2_0']['conv1']['kernel'].shape == (3, 3, 64, 128)
  assert resnet.feature_dim(depth) == 512


def test_small_stem_width_and_input_channels():
  model = resnet.resnet(depth=18, width=0.25, small_stem=True)
  for channels in (3, 1):
    v = _shapes(model, size=28, channels=channels)
    assert v['params']['conv1']['kernel'].shape == (3, 3, channels, 16)
  _, inter = jax.eval_shape(lambda v: model.apply(v, jnp.zeros((2, 28, 28, 1)),
                                                  capture_intermediates=True,
                                                  mutable=['intermediates']), v)
  i = inter['intermediates']
  assert i['layer1_1']['__call__'][0].shape == (2, 28, 28, 16)  # stride 1, no max-pool
  assert i['layer4_1']['__call__'][0].shape == (2, 4, 4, 128)
  assert i['__call__'][0].shape == (2, 128) == (2, resnet.feature_dim(18, 0.25))


def test_init_is_kaiming_fan_out_with_optional_zero_init_residual():
  bn = functools.partial(norm.BatchNorm, use_running_average=False)
  x = jnp.ones((1, 4, 4, 256))
  for zero in (False, True):
    block = resnet.Bottleneck(planes=256, stride=2, norm=bn, zero_init_last=zero)
    v = _init(block, x)['params']
    w = np.asarray(v['conv2']['kernel'])           # 3x3, 256 -> 256: fan_out = 9 * 256
    std = np.sqrt(2.0 / (9 * 256))
    assert abs(w.std() / std - 1) < 0.01 and abs(w.mean()) < 0.01 * std
    assert np.abs(w).max() > 4 * std               # untruncated normal, as torch's
    np.testing.assert_array_equal(v['bn3']['scale'], 0.0 if zero else 1.0)
    np.testing.assert_array_equal(v['bn1']['scale'], 1.0)
    np.testing.assert_array_equal(v['downsample_1']['scale'], 1.0)  # never zeroed
    assert all(not np.any(v[k]['bias']) for k in ('bn1', 'bn2', 'bn3'))
  basic = resnet.BasicBlock(planes=8, stride=1, norm=bn, zero_init_last=True)
  v = _init(basic, jnp.ones((1, 4, 4, 8)))['params']
  np.testing.assert_array_equal(v['bn2']['scale'], 0.0)
  assert 'downsample_0' not in v


def test_tiny_resnet_trains_with_group_bn_and_infers_with_running_stats():
  model = resnet.resnet(depth=18, width=1 / 16, small_stem=True, bn_stats='group',
                        bn_group_size=4, zero_init_residual=True)
  x = jax.random.normal(jax.random.key(1), (8, 8, 8, 1))
  v = _init(model, x)
  assert all(not np.any(v['params'][f'layer{s}_{i}']['bn2']['scale'])
             for s in range(1, 5) for i in range(2))

  @jax.jit  # one compile for both modes
  def train_then_infer(v, x):
    y, upd = model.apply(v, x, train=True, mutable=['batch_stats'])
    return y, upd, model.apply({'params': v['params'], **upd}, x[:3], train=False)

  y, upd, y_eval = train_then_infer(v, x)
  assert y.shape == (8, 32) and np.all(np.isfinite(y))
  assert not np.allclose(upd['batch_stats']['bn1']['mean'], 0)
  assert y_eval.shape == (3, 32)  # inference: running statistics, any batch size


def test_bad_depth_and_bn_stats_are_clear_errors():
  with pytest.raises(ValueError, match='model.depth=42'):
    resnet.resnet(depth=42)
  with pytest.raises(ValueError, match='model.bn_stats'):
    resnet.resnet(depth=18, bn_stats='sync')


def test_mocov3_resnet50_heads():
  c = common.mocov3_resnet()
  assert (c.temperature, c.optimizer.name, c.model.bn_stats) == (1.0, 'lars', 'global')
  assert c.model.zero_init_residual
  method = mocov3.MoCoV3(c)
  v = jax.eval_shape(lambda: method.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
  proj, pred = v['params']['projector'], v['params']['predictor']
  # Projector 2048 -> 4096 -> 256 ending in a BN without affine parameters.
  assert proj['linear_0']['kernel'].shape == (2048, 4096)
  assert proj['linear_1']['kernel'].shape == (4096, 256)
  assert 'bn_0' in proj and 'bn_1' not in proj and 'bn_1' in v['batch_stats']['projector']
  # Predictor 256 -> 4096 -> 256 with no BN after its last layer.
  assert pred['linear_0']['kernel'].shape == (256, 4096)
  assert pred['linear_1']['kernel'].shape == (4096, 256)
  assert sorted(pred) == ['bn_0', 'linear_0', 'linear_1']
  assert sorted(v['batch_stats']['predictor']) == ['bn_0']
  assert _count(v['params']['backbone']) == 23_508_032
