"""The backbone registry: every entry's declarations hold for the module it builds."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import demo, demo_mocov3_resnet
from mocojax import models, parallel


def _model_config(name, frozen):
  c = (demo if name == 'vit' else demo_mocov3_resnet).get_config().model
  if name == 'vit':
    c.stop_grad_patch_embed = frozen
  return c


@pytest.mark.parametrize('name,frozen', [('vit', False), ('vit', True), ('resnet', False)])
def test_registry_entry_matches_its_module(name, frozen):
  config = _model_config(name, frozen)
  entry = models.backbone(config)
  module = entry.build(config, jnp.float32)
  assert models.of_module(module) is entry
  images = jnp.zeros((2, 28, 28, 1))
  variables = jax.eval_shape(lambda: module.init(jax.random.key(0), images))
  features = jax.eval_shape(lambda v: module.apply(v, images), variables)
  assert features.shape == (2, entry.feature_dim(config))
  assert entry.input_channels(variables['params']) == 1

  names = [f'backbone/{parallel.path_name(p)}'
           for p, _ in jax.tree_util.tree_leaves_with_path(variables['params'])]
  under = lambda prefix: [n for n in names if n.startswith(prefix)]
  probes = entry.grad_probes(config)
  assert set(probes) == {'first_layer', 'last_block'}
  for prefix in probes.values():
    assert under(prefix), (prefix, names[:5])
  # The last block is the deepest one (blocks_i, or layer<stage>_i).
  blocks = {n.split('/')[1] for n in names if re.fullmatch(r'(blocks|layer\d)_\d+', n.split('/')[1])}
  depth = lambda b: tuple(int(x) for x in re.findall(r'\d+', b))
  assert probes['last_block'].rstrip('/').split('/')[1] == max(blocks, key=depth)
  frozen_prefixes = entry.frozen_prefixes(config)
  assert bool(frozen_prefixes) == frozen
  for prefix in frozen_prefixes:
    assert under(prefix) and not any(p.startswith(prefix) for p in probes.values())
  assert set(entry.probe_recipe) == {'base_lr', 'epochs', 'schedule'}
  assert isinstance(entry.feature_name(config), str)


def test_unknown_backbone_names_the_setting_and_the_choices():
  config = _model_config('vit', False)
  config.name = 'convnext'
  with pytest.raises(ValueError, match=r"model.name='convnext'.*\('vit', 'resnet'\)"):
    models.build_backbone(config)
  assert models.of_module(object()) is None
  np.testing.assert_equal(models.BACKBONES, ('vit', 'resnet'))
