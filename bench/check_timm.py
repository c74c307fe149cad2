r"""Checks a safetensors export against timm itself. Needs torch and timm; not run in CI (the
test suite checks names and shapes against a committed key list, and the layouts against a
numpy transcription of timm's forward pass).

  pip install torch timm
  python bench/check_timm.py                          # a random MoCo v3 ViT-S/16, exported here
  python bench/check_timm.py --encoder=runs/enc       # an encoder exported with
                                                      #   --format=orbax,safetensors

Creates timm.create_model('vit_small_patch16_224', num_classes=0) with the architecture
arguments the export wrote into model.json (for ViT-S/16 that only changes num_heads to 12,
MoCo v3's choice; any other size or patch overrides the rest), loads model.safetensors with
strict=True, and compares timm's pooled features with the JAX encoder's on the same random
input. Exits non-zero if they differ by more than --rtol times the features' largest magnitude.
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
from mocojax.models import vit as vit_lib  # noqa: E402


def random_vit_small(out_dir: str) -> str:
  """Exports a randomly initialised MoCo v3 ViT-S/16 with every parameter perturbed (so that a
  zero bias or a unit LayerNorm cannot hide a wrong name or transpose)."""
  model = ml_collections.ConfigDict(dict(name='vit', variant='small', patch_size=16))
  module = vit_lib.vit('small', patch_size=16)
  variables = jax.jit(module.init)(jax.random.key(0), np.zeros((1, 224, 224, 3), np.float32))
  rng = np.random.default_rng(0)
  variables = jax.tree.map(
      lambda a: np.asarray(a) + 0.02 * rng.standard_normal(a.shape).astype(np.float32), variables)
  encoder.write_encoder(out_dir, model, variables, image_size=224, channels=3,
                        mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                        formats=('orbax', 'safetensors'))
  return out_dir


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--encoder', help='encoder directory with model.safetensors and variables/')
  parser.add_argument('--batch', type=int, default=4)
  parser.add_argument('--rtol', type=float, default=1e-4,
                      help='tolerance relative to the largest feature magnitude')
  args = parser.parse_args()

  import timm
  import torch
  from safetensors.torch import load_file

  with tempfile.TemporaryDirectory() as tmp:
    path = args.encoder or random_vit_small(tmp)
    info = encoder.read_model_json(path)
    if 'safetensors' not in info['files'] or 'orbax' not in info['files']:
      sys.exit(f'{path} needs both formats: export with --format=orbax,safetensors.')
    kwargs = info['torch']['kwargs']
    model = timm.create_model('vit_small_patch16_224', pretrained=False, **kwargs)
    state = load_file(os.path.join(path, info['files']['safetensors']))
    model.load_state_dict(state, strict=True)  # raises on any missing or unexpected key
    model.eval()

    module, variables = encoder.load_encoder(path)
    size, channels = info['image_size'], info['channels']
    x = np.random.default_rng(1).standard_normal((args.batch, size, size, channels))
    x = x.astype(np.float32)
    ours = np.asarray(jax.jit(lambda v, x: module.apply(v, x, train=False))(variables, x))
    with torch.no_grad():
      theirs = model(torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()).numpy()

  diff, scale = float(np.max(np.abs(ours - theirs))), float(np.max(np.abs(ours)))
  print(json.dumps(dict(timm=timm.__version__, torch=torch.__version__, encoder=path,
                        kwargs=kwargs, keys=len(state), feature_shape=list(ours.shape),
                        max_abs_diff=diff, feature_scale=scale, relative_diff=diff / scale),
                   indent=2))
  if ours.shape != theirs.shape or diff > args.rtol * scale:
    sys.exit(f'MISMATCH: max |jax - timm| = {diff}, {diff / scale:.2e} of the features\' '
             f'largest magnitude {scale} (> {args.rtol})')
  print('OK: timm loads the export strictly and computes the same features.')


if __name__ == '__main__':
  main()
