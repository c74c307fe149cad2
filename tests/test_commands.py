"""Host set-up shared by the entry points."""

import subprocess
import sys

import pytest

# Allocates and frees a 40 MiB buffer (above glibc's largest default mmap threshold, as the CPU
# backend's float32 views at batch 64) five times; prints the fewest page faults of rounds 2-5.
_FAULTS = '''
import resource, sys
import numpy as np
from mocojax import commands
if sys.argv[1] == 'reuse':
  assert commands.reuse_large_blocks()
counts = []
for _ in range(5):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  buffer = np.ones(40 << 20, np.uint8)
  del buffer
  counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(min(counts[1:]))
'''


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='glibc mallopt')
def test_reuse_large_blocks_stops_refaulting_a_buffer_every_step():
  def faults(how):
    out = subprocess.run([sys.executable, '-c', _FAULTS, how], capture_output=True, text=True,
                         check=True)
    return int(out.stdout.split()[-1])
  # Without: the buffer is mapped afresh each round (20 faults even in 2 MiB huge pages).
  assert faults('default') >= 10
  # With: the freed block is reused, already in memory.
  assert faults('reuse') <= 2
