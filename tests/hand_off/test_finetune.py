"""Fine-tuning: the step lowers the loss, layer-wise decay scales, and a short run end to end."""

import jax
import jax.numpy as jnp
import numpy as np

from configs import finetune_demo
from mocojax.downstream import fine_tuning
from mocojax.hand_off import encoder


def _config(**overrides):
  c = finetune_demo.get_config()
  c.batch_size, c.eval_batch_size, c.log_every_steps = 32, 40, 2
  c.warmup_epochs, c.data.mean, c.data.std = 0.0, (0.5,), (0.25,)
  for k, v in overrides.items():
    c[k] = v
  return c


def test_fine_tune_step_lowers_the_loss(pretraining_run, toy_sources, tmp_path):
  workdir, _ = pretraining_run
  out = tmp_path / 'encoder'
  encoder.export_encoder(str(workdir), str(out))
  c = _config(total_steps=1000, base_lr=1e-2)  # a long schedule: lr ~ constant over 8 steps
  model, variables, info, tx, lr, _ = fine_tuning.build(c, str(out), steps_per_epoch=10,
                                                        num_classes=3)
  state = jax.jit(lambda v: fine_tuning.init_state(v, model=model, tx=tx, seed=0,
                                                   image_shape=(28, 28, 1)))(variables)
  images, labels = (np.asarray(a) for a in toy_sources[0].lookup(np.arange(32)).values())
  batch = {'image': jnp.asarray((images / 255.0 - 0.5) / 0.25, jnp.float32),
           'label': jnp.asarray(labels)}
  step = jax.jit(lambda s, b: fine_tuning.train_step(s, b, model=model, tx=tx, lr=lr,
                                                      label_smoothing=c.label_smoothing))
  losses = []
  for _ in range(8):
    state, metrics = step(state, batch)
    losses.append(float(metrics['loss']))
  assert abs(losses[0] - np.log(3)) < 1e-5  # zero-initialised head: uniform logits
  assert all(b < a for a, b in zip(losses, losses[1:])), losses
  assert losses[-1] < losses[0] - 0.1, losses
  # The backbone was trained too, not only the head.
  moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), state.params['backbone'],
                       variables['params'])
  assert moved['blocks_0']['fc1']['kernel'] > 0


def test_layer_wise_decay_scales_by_depth(tmp_path):
  from mocojax.models import vit as vit_lib
  module = vit_lib.vit('custom', width=16, depth=3, num_heads=2, patch_size=7,
                       posemb='learned')
  model = fine_tuning.Classifier(module, 5)
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)),
                                             train=False))['params']
  scales = fine_tuning.layer_scales(params, module, 0.5)
  b = scales['backbone']
  assert b['patch_embed']['kernel'] == b['cls_token'] == b['pos_embed'] == 0.5**4
  assert b['blocks_0']['fc1']['kernel'] == 0.5**3 and b['blocks_2']['norm1']['scale'] == 0.5
  assert b['norm']['scale'] == scales['head']['kernel'] == 1.0
  mask = fine_tuning.weight_decay_mask(params)
  assert mask['head']['kernel'] and not mask['head']['bias']
  assert not mask['backbone']['cls_token'] and not mask['backbone']['pos_embed']


def test_short_fine_tuning_run(pretraining_run, toy_sources, tmp_path):
  workdir, _ = pretraining_run
  out = tmp_path / 'encoder'
  encoder.export_encoder(str(workdir), str(out))
  c = _config(total_steps=16, epochs=2.0, base_lr=2e-3, eval_every_epochs=0)
  result = fine_tuning.run(str(out), c, str(tmp_path / 'ft'), train_source=toy_sources[0],
                           eval_source=toy_sources[1])
  assert result['steps'] == 16 and result['eval_examples'] == 200
  print(result)
  assert result['top1'] > 0.5  # chance is 1/3
  assert (tmp_path / 'ft' / 'result.json').exists()


def _saved_params(workdir, step):
  import orbax.checkpoint as ocp
  with ocp.CheckpointManager(workdir / 'checkpoints', item_names=('state', 'meta')) as manager:
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  return restored.state['params']


def test_interrupted_fine_tuning_resumes_the_same_run(pretraining_run, toy_sources, tmp_path):
  import pytest
  workdir, _ = pretraining_run
  out = tmp_path / 'encoder'
  encoder.export_encoder(str(workdir), str(out))
  sources = dict(train_source=toy_sources[0], eval_source=toy_sources[1])
  c = _config(total_steps=12, epochs=2.0, base_lr=2e-3, eval_every_epochs=0,
              checkpoint_every_steps=4)
  whole = fine_tuning.run(str(out), c, str(tmp_path / 'whole'), **sources)

  # Preempted after step 6: the last checkpoint is step 6's (the stop step is saved).
  c_cut = _config(total_steps=12, epochs=2.0, base_lr=2e-3, eval_every_epochs=0,
                  checkpoint_every_steps=4, stop_after_steps=6)
  fine_tuning.run(str(out), c_cut, str(tmp_path / 'cut'), **sources)
  resumed = fine_tuning.run(str(out), c, str(tmp_path / 'cut'), **sources)
  assert resumed['resumed_from'] == 6 and whole['resumed_from'] == 0
  assert resumed['top1'] == whole['top1']
  a, b = _saved_params(tmp_path / 'whole', 12), _saved_params(tmp_path / 'cut', 12)
  jax.tree.map(np.testing.assert_array_equal, a, b)   # batch for batch the same run

  # Another recipe in the same workdir is refused before anything runs.
  with pytest.raises(ValueError, match='base_lr'):
    fine_tuning.run(str(out), _config(total_steps=12, epochs=2.0, base_lr=5e-3,
                                      eval_every_epochs=0, checkpoint_every_steps=4),
                    str(tmp_path / 'cut'), **sources)


def test_a_diverging_fine_tuning_run_stops_unsaved(pretraining_run, toy_sources, tmp_path):
  """The loop's finite-check policy: the step is named, with the first non-finite layer group,
  and no checkpoint of it (or later) exists."""
  import os

  import pytest

  from mocojax import loop
  workdir, _ = pretraining_run
  out = tmp_path / 'encoder'
  encoder.export_encoder(str(workdir), str(out))
  c = _config(total_steps=12, epochs=2.0, base_lr=1e30, eval_every_epochs=0,
              checkpoint_every_steps=1)
  with pytest.raises(loop.DivergenceError,
                     match=r'Step (\d+) diverged: .*non-finite from backbone/\w+ on') as e:
    fine_tuning.run(str(out), c, str(tmp_path / 'ft'), train_source=toy_sources[0],
                    eval_source=toy_sources[1])
  diverged = int(str(e.value).split()[1])
  saved = [int(d) for d in os.listdir(tmp_path / 'ft' / 'checkpoints') if d.isdigit()]
  assert all(s < diverged for s in saved), (saved, diverged)
