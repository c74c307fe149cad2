r"""Throughput of a PyTorch MoCo v3 reference input loader, for comparison with bench/input_pipeline.py.

Measures two-view images/s out of a torchvision `ImageFolder` + `DataLoader` with the MoCo v3
ImageNet augmentation (per view: RandomResizedCrop 224 at scale (0.08, 1), ColorJitter
(0.4, 0.4, 0.2, 0.1) with p=0.8, grayscale p=0.2, PIL Gaussian blur sigma ~ U[0.1, 2] with
p=1.0 / 0.1, PIL solarize with p=0.0 / 0.2, horizontal flip, ToTensor, ImageNet Normalize),
on the same JPEG folder that `jpeg224` in bench/input_pipeline.py reads, so that the two rates
taken on one machine give a ratio. Batches stay on the host (no device, pin_memory=False).
Images/s counts two-view samples; "per core" divides by the cores the process may use.

Runs in its own venv with torch (no tensorflow, no mocojax imports), outside the repo:

  python3 -m venv /tmp/torchref
  /tmp/torchref/bin/pip install torch torchvision --index-url https://download.pytorch.org/whl/cpu \
    || /tmp/torchref/bin/pip install torch torchvision

  # the JPEG folder, written by the project venv (has tensorflow):
  .venv/bin/python -c "import sys; sys.path.insert(0, 'bench'); \
    from input_pipeline import write_jpeg_folder; write_jpeg_folder('/tmp/refjpeg', 512)"

  /tmp/torchref/bin/python bench/reference_loader.py --data_dir=/tmp/refjpeg

torch and torchvision must be the same build: a +cpu torch (e.g. from a local wheel cache) with
PyPI's CUDA torchvision fails at `import torchvision` ("operator torchvision::nms does not
exist"); then install the PyPI torch of the matching version, bypassing local wheel config:
  /tmp/torchref/bin/pip install --isolated --cert /etc/ssl/certs/ca-certificates.crt torch==2.13.0
The CUDA build of torch runs this CPU-only loader at the same speed.
"""

import argparse
import os
import random
import time

import PIL
import torch
import torchvision
from PIL import ImageFilter, ImageOps
from torchvision import datasets, transforms

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class GaussianBlur:
  """PIL blur with a random sigma; torchvision's own blur is a different kernel and cost."""

  def __init__(self, p: float, sigma=(0.1, 2.0)):
    self.p, self.sigma = p, sigma

  def __call__(self, img):
    if random.random() >= self.p:
      return img
    return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(*self.sigma)))


class Solarize:
  """PIL solarize at threshold 128, applied with probability p."""

  def __init__(self, p: float):
    self.p = p

  def __call__(self, img):
    return ImageOps.solarize(img) if random.random() < self.p else img


class TwoViews:
  """Two independently augmented views of one decoded image (decoded once, as in MoCo v3)."""

  def __init__(self, t1, t2):
    self.t1, self.t2 = t1, t2

  def __call__(self, img):
    return [self.t1(img), self.t2(img)]


def view_transform(blur_p: float, solarize_p: float):
  return transforms.Compose([
      transforms.RandomResizedCrop(224, scale=(0.08, 1.0)),
      transforms.RandomApply([transforms.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
      transforms.RandomGrayscale(p=0.2),
      GaussianBlur(p=blur_p),
      Solarize(p=solarize_p),
      transforms.RandomHorizontalFlip(),
      transforms.ToTensor(),
      transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
  ])


def batches(loader):
  """Endless batches: re-iterates the loader (persistent workers survive epoch ends)."""
  while True:
    yield from loader


def main():
  cores = len(os.sched_getaffinity(0))
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--data_dir', required=True, help='Folder written by write_jpeg_folder.')
  ap.add_argument('--workers', type=int, default=cores, help='DataLoader worker processes.')
  ap.add_argument('--seconds', type=float, default=20.0, help='Timed seconds after warm-up.')
  ap.add_argument('--batch', type=int, default=64, help='Batch size (two-view samples).')
  args = ap.parse_args()

  print(f'torch {torch.__version__}, torchvision {torchvision.__version__}, '
        f'Pillow {PIL.__version__}')
  ds = datasets.ImageFolder(args.data_dir, TwoViews(view_transform(1.0, 0.0),
                                                    view_transform(0.1, 0.2)))
  loader = torch.utils.data.DataLoader(
      ds, batch_size=args.batch, num_workers=args.workers, shuffle=True, drop_last=True,
      persistent_workers=args.workers > 0, pin_memory=False)
  print(f'{len(ds)} images in {len(ds.classes)} classes, {len(loader)} batches per epoch')

  it = batches(loader)
  for _ in range(3):  # warm-up: worker start-up, first prefetch
    next(it)
  n, t0 = 0, time.perf_counter()
  while time.perf_counter() - t0 < args.seconds:
    (v1, v2), _ = next(it)
    n += v1.shape[0]
  rate = n / (time.perf_counter() - t0)
  print(f'reference loader: {rate:.1f} two-view images/s ({rate / cores:.1f} per core), '
        f'{args.workers} workers, batch {args.batch}')


if __name__ == '__main__':
  main()
