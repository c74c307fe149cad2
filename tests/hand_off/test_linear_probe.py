"""Linear probe: beats chance on a toy dataset, and leaves the backbone bit-identical."""

import json

import jax
import numpy as np
import pytest

from configs import linear_probe as probe_configs
from mocojax.downstream import linear_probe
from mocojax.hand_off import pretraining_run as run_lib


def _probe_config(**overrides):
  c = probe_configs.get_config()
  c.batch_size, c.eval_batch_size, c.log_every_steps = 64, 64, 3
  for k, v in overrides.items():
    c[k] = v
  return c


def _assert_bit_identical(a, b):
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape, path
    assert x.tobytes() == y.tobytes(), f'backbone changed at {jax.tree_util.keystr(path)}'


def test_fast_probe_with_lr_sweep_beats_chance(pretraining_run, toy_sources, tmp_path):
  workdir, _ = pretraining_run
  c = _probe_config(fast=True, epochs=15.0, lr_multipliers=(0.1, 1.0), feature_norm=True)
  result, _ = linear_probe.run(str(workdir), c, outdir=str(tmp_path / 'probe'),
                               train_source=toy_sources[0], eval_source=toy_sources[1])
  assert set(result['top1_by_lr']) == {'0.075', '0.75'}  # ViT recipe: 3 * m * 64 / 256
  assert result['top1'] == max(result['top1_by_lr'].values())
  assert result['top1'] > 0.6, result  # chance is 1/3
  assert (tmp_path / 'probe' / 'result.json').exists()


def test_augmented_probe_leaves_resnet_bit_identical(resnet_run, toy_sources, tmp_path):
  workdir, saved = resnet_run
  c = _probe_config(epochs=6.0, crop_scale=(0.5, 1.0), feature_norm=True)
  result, trained = linear_probe.run(str(workdir), c, outdir=str(tmp_path / 'probe'),
                                     train_source=toy_sources[0], eval_source=toy_sources[1])
  assert result['mode'] == 'augmented' and result['pretraining_step'] == 7
  assert result['best_lr'] == pytest.approx(0.1 * 64 / 256)  # ResNet v3 recipe: base lr 0.1
  # The heads learned (on a random ResNet's features accuracy after 36 steps says little: the
  # fast test above checks that a probe beats chance) ...
  losses = [r['loss/lr=0.025'] for r in map(json.loads, open(tmp_path / 'probe' / 'metrics.jsonl'))
            if 'loss/lr=0.025' in r]
  assert int(trained['heads'].step) == 36 and losses[-1] < losses[0] - 0.1, losses
  # ... and the backbone the probe used, and the one on disk, did not change: weights and BN
  # running statistics (BN ran in inference mode).
  want = {'params': saved.params['backbone'], 'batch_stats': saved.batch_stats['backbone']}
  _assert_bit_identical(trained['backbone'].variables, want)
  _assert_bit_identical(run_lib.restore_backbone(str(workdir)).variables, want)


def test_interrupted_augmented_probe_resumes_the_same_run(resnet_run, toy_sources, tmp_path):
  workdir, _ = resnet_run
  sources = dict(train_source=toy_sources[0], eval_source=toy_sources[1])
  c = _probe_config(epochs=2.0, crop_scale=(0.5, 1.0), checkpoint_every_steps=4)
  _, whole = linear_probe.run(str(workdir), c, outdir=str(tmp_path / 'whole'), **sources)
  # Preempted after step 5 of 12, then the same command again.
  linear_probe.run(str(workdir), _probe_config(epochs=2.0, crop_scale=(0.5, 1.0),
                                               checkpoint_every_steps=4, stop_after_steps=5),
                   outdir=str(tmp_path / 'cut'), **sources)
  result, resumed = linear_probe.run(str(workdir), c, outdir=str(tmp_path / 'cut'), **sources)
  assert result['resumed_from'] == 5 and int(resumed['heads'].step) == 12
  jax.tree.map(np.testing.assert_array_equal, whole['heads'].params, resumed['heads'].params)
  with pytest.raises(ValueError, match='crop_scale'):
    linear_probe.run(str(workdir), _probe_config(epochs=2.0, crop_scale=(0.2, 1.0),
                                                 checkpoint_every_steps=4),
                     outdir=str(tmp_path / 'cut'), **sources)


def test_probe_recipe_follows_the_method_then_the_backbone():
  """The reference probes: MoCo v1/v2 SGD lr 30 for 100 epochs with steps (the method's own);
  otherwise the backbone's: ViT lr 3.0, ResNet lr 0.1, 90 epochs cosine."""
  from configs import demo, demo_mocov1, demo_mocov2, demo_mocov3_resnet, demo_simclr
  want = {demo_mocov1: (30.0, 100.0, 'steps'), demo_mocov2: (30.0, 100.0, 'steps'),
          demo: (3.0, 90.0, 'cosine'), demo_simclr: (3.0, 90.0, 'cosine'),
          demo_mocov3_resnet: (0.1, 90.0, 'cosine')}
  for module, (base_lr, epochs, schedule) in want.items():
    assert linear_probe.recipe(module.get_config()) == dict(
        base_lr=base_lr, epochs=epochs, schedule=schedule), module.__name__


@pytest.mark.parametrize('fast', [True, False])
def test_a_diverging_head_stops_the_probe_and_is_named(pretraining_run, toy_sources, tmp_path,
                                                       fast):
  from mocojax import loop
  workdir, _ = pretraining_run
  c = _probe_config(fast=fast, epochs=2.0, lr_multipliers=(1.0, 1e38), checkpoint_every_steps=1)
  with pytest.raises(loop.DivergenceError,
                     match=r'Step \d+ diverged: the loss is \w+ for lr=7\.5e\+37') as e:
    linear_probe.run(str(workdir), c, outdir=str(tmp_path / 'probe'),
                     train_source=toy_sources[0], eval_source=toy_sources[1])
  assert 'lr=0.75' not in str(e.value).split('.')[0]
  if not fast:
    diverged = int(str(e.value).split()[1])
    saved = [int(d.name) for d in (tmp_path / 'probe' / 'checkpoints').iterdir()
             if d.name.isdigit()]
    assert all(s < diverged for s in saved), (saved, diverged)
