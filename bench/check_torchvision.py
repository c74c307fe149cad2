r"""Checks a ResNet safetensors export against torchvision itself. Needs torch and torchvision;
not run in CI (the suite checks the names, shapes and BN statistics of the export).

  pip install torch torchvision
  python bench/check_torchvision.py                        # random ResNet-50 and a small-stem
                                                           # ResNet-18, exported here
  python bench/check_torchvision.py --encoder=runs/enc     # an encoder exported with
                                                           #   --format=orbax,safetensors

Builds torchvision.models.resnet{depth}() with the changes model.json lists (small stem, input
channels; fc = Identity), loads model.safetensors with strict=True, and compares torchvision's
inference-mode features with the JAX encoder's on the same random input. Exits non-zero if they
differ by more than --rtol times the features' largest magnitude. Widths other than 1 have no
torchvision counterpart.
"""

import argparse
import json
import os
import sys
import tempfile

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))

import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from mocojax.hand_off import encoder  # noqa: E402
from mocojax.models import resnet as resnet_lib  # noqa: E402


def random_resnet(out_dir: str, depth: int, small_stem: bool, channels: int, size: int) -> str:
  """Exports a ResNet with random weights and BN running statistics that are not the init's."""
  model = ml_collections.ConfigDict(dict(name='resnet', depth=depth, small_stem=small_stem))
  module = resnet_lib.resnet(**model.to_dict())
  variables = jax.jit(module.init)(jax.random.key(0), np.zeros((1, size, size, channels),
                                                                np.float32))
  rng = np.random.default_rng(0)
  stats = jax.tree.map(lambda a: np.asarray(a) + rng.uniform(0, 0.2, a.shape).astype(np.float32),
                       variables['batch_stats'])
  params = jax.tree.map(
      lambda a: np.asarray(a) + 0.01 * rng.standard_normal(a.shape).astype(np.float32),
      variables['params'])
  encoder.write_encoder(out_dir, model, {'params': params, 'batch_stats': stats},
                        image_size=size, channels=channels, mean=(0.5,) * channels,
                        std=(0.25,) * channels, formats=('orbax', 'safetensors'))
  return out_dir


def check(path: str, rtol: float, batch: int) -> float:
  import torch
  import torchvision
  from safetensors.torch import load_file

  info = encoder.read_model_json(path)
  if 'safetensors' not in info['files'] or 'orbax' not in info['files']:
    sys.exit(f'{path} needs both formats: export with --format=orbax,safetensors.')
  model_cfg, channels, size = info['model'], info['channels'], info['image_size']
  if model_cfg.get('width', 1.0) != 1.0:
    sys.exit(f'{path}: width {model_cfg["width"]} has no torchvision counterpart.')
  net = getattr(torchvision.models, info['torch']['model'])()
  if model_cfg.get('small_stem'):
    net.conv1 = torch.nn.Conv2d(channels, 64, 3, 1, 1, bias=False)
    net.maxpool = torch.nn.Identity()
  elif channels != 3:
    net.conv1 = torch.nn.Conv2d(channels, 64, 7, 2, 3, bias=False)
  net.fc = torch.nn.Identity()
  state = load_file(os.path.join(path, info['files']['safetensors']))
  # torchvision's BN also has num_batches_tracked, unused with a fixed momentum: keep its own.
  state.update({k: v for k, v in net.state_dict().items() if k.endswith('num_batches_tracked')})
  net.load_state_dict(state, strict=True)
  net.eval()

  module, variables = encoder.load_encoder(path)
  x = np.random.default_rng(1).standard_normal((batch, size, size, channels)).astype(np.float32)
  ours = np.asarray(jax.jit(lambda v, x: module.apply(v, x, train=False))(variables, x))
  with torch.no_grad():
    theirs = net(torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()).numpy()
  diff, scale = float(np.max(np.abs(ours - theirs))), float(np.max(np.abs(ours)))
  print(json.dumps(dict(torchvision=torchvision.__version__, encoder=path,
                        model=info['torch']['model'], changes=info['torch']['changes'],
                        feature_shape=list(ours.shape), max_abs_diff=diff, feature_scale=scale,
                        relative_diff=diff / scale), indent=2))
  if ours.shape != theirs.shape or diff > rtol * scale:
    sys.exit(f'MISMATCH: max |jax - torchvision| = {diff}, {diff / scale:.2e} of the features\' '
             f'largest magnitude {scale} (> {rtol})')
  return diff


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--encoder', help='encoder directory with model.safetensors and variables/')
  parser.add_argument('--batch', type=int, default=2)
  parser.add_argument('--rtol', type=float, default=1e-4,
                      help='tolerance relative to the largest feature magnitude')
  args = parser.parse_args()
  if args.encoder:
    check(args.encoder, args.rtol, args.batch)
  else:
    for depth, small_stem, channels, size in ((50, False, 3, 64), (18, True, 1, 28)):
      with tempfile.TemporaryDirectory() as tmp:
        check(random_resnet(tmp, depth, small_stem, channels, size), args.rtol, args.batch)
  print('OK: torchvision loads the export strictly and computes the same features.')


if __name__ == '__main__':
  main()
