"""Every test sees 8 CPU devices, so multi-device code is exercised without an accelerator."""

import os

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import pytest  # noqa: E402


@pytest.fixture
def tiny_config():
  """MoCo v3 with a 2-block ViT on 28x28 single-channel images: fast enough for CPU tests."""
  from configs import demo
  c = demo.get_config()
  c.model.width, c.model.depth, c.model.num_heads, c.model.patch_size = 32, 2, 2, 7
  c.head.hidden_dim, c.head.out_dim = 64, 32
  c.batch_size = 32
  c.eval.batch_size = 512
  c.log_every_steps = 5
  c.plot = False
  return c
