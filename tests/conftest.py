"""Every test sees 8 CPU devices, so multi-device code is exercised without an accelerator."""

import os

_flags = os.environ.get('XLA_FLAGS', '')
if '--xla_force_host_platform_device_count' not in _flags:
  _flags += ' --xla_force_host_platform_device_count=8'
# XLA:CPU aborts the whole process ("Termination timeout ... of 40 seconds exceeded", no Python
# error) when a rendezvous of its in-process collectives has waited 60 s (a warning at 20 s, then
# 40 s more); 8 virtual devices on 2 loaded cores are slower than the devices it has in mind, so
# the `collective_call` limit is 5 minutes: a slow step stays slow, and a deadlock (the one
# evaluation/features.py prevents was one) still ends with XLA's message instead of hanging CI.
# `collective_timeout` is the cross-process limit (the two-process tests).
for _flag in ('--xla_cpu_collective_call_terminate_timeout_seconds=300',
              '--xla_cpu_collective_timeout_seconds=1200'):
  if _flag.split('=')[0] not in _flags:
    _flags += ' ' + _flag
os.environ['XLA_FLAGS'] = _flags.strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import pytest  # noqa: E402


@pytest.fixture
def tiny_config():
  return tiny()


@pytest.fixture(scope='module')
def make_tiny_config():
  """`tiny`, for module-scoped fixtures (a test module cannot import this conftest by name:
  tests/hand_off has one too)."""
  return tiny


def tiny():
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
