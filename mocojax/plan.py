r"""Plans a pod run without one: compiles the real train step for N devices on this CPU.

  python -m mocojax.plan --config=configs/mocov3_vit_base.py --devices=256 --dtype=bfloat16 \
      [--batch=4096] [--fsdp=4] [--platform-peak-tflops=459] [--mfu=0.4]

The step is the trainer's (`step.setup`): the state laid out by `parallel.state_shardings`
(config.mesh and config.sharding_rules; --fsdp=K sets the mesh to data x fsdp=K), the step
wrapped by `parallel.gather_parameters`, jitted with the batch split over every device and
the state donated. It is lowered on ShapeDtypeStructs and compiled ahead of time for N
virtual CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=N, set here before JAX
is imported): nothing is allocated and no accelerator is needed.

Printed, per device: the state by kind (parameters, optimizer state, ...) from the shardings,
XLA's memory analysis (arguments, temporaries, total) and FLOPs (`cost_analysis`); for the
step: FLOPs over all devices, the collectives in the compiled program (count and bytes of
their results), and the step time and whole-run wall time of devices with a stated peak at a
stated MFU (time = FLOPs / (devices x peak x MFU); ImageNet's 1,281,167 images per epoch).

The memory figures are indicative, not the accelerator's: the CPU backend fuses, lays out and
schedules differently from TPU and GPU backends (and keeps f32 where they may not), so
temporaries in particular can differ severalfold. The compile uses XLA's memory-optimised CPU
scheduler (the default one keeps activations alive for concurrency, and shows no saving from
remat). Parameters and optimizer state follow from the shardings alone and carry over exactly.
Collective bytes are those of the CPU program; other backends combine and reassociate
collectives differently (e.g. the CPU program all-reduces each view's gradient separately).
"""

import os
import re
import sys

IMAGENET_TRAIN_IMAGES = 1_281_167

# Dense bf16 peak TFLOP/s per chip, for the table printed when --platform-peak-tflops is unset.
REFERENCE_PEAKS = (('TPU v4', 275.0), ('TPU v5e', 197.0), ('TPU v5p', 459.0),
                   ('A100', 312.0), ('H100 SXM', 989.0))

# The one comparison with an accelerator so far, printed beside every memory figure: the CPU
# compile's total against the peak bench/train_step.py measured on one H200 (2026-11-30).
KNOWN_BIAS = (
    '    known bias: ~30% high against one H200 for ViT-B/16 bf16 (einsum attention, float32\n'
    '      softmax residuals): measured peaks 60.8 GiB at batch 256 and 98.8 GiB at 512, so\n'
    '      ~42 GiB at 128 by interpolation, where this planner gave 54.9 GiB for 128 per device')

COLLECTIVES = ('all-reduce', 'all-gather', 'reduce-scatter', 'all-to-all', 'collective-permute')


def _devices_from_argv(argv) -> int:
  for i, arg in enumerate(argv):
    if arg.startswith('--devices='):
      return int(arg.split('=', 1)[1])
    if arg == '--devices' and i + 1 < len(argv):
      return int(argv[i + 1])
  return 8


def _set_device_count(n: int):
  """Must run before JAX is imported: the CPU backend reads the flag once, at start-up."""
  if 'jax' in sys.modules:
    raise RuntimeError('mocojax.plan must set XLA_FLAGS before JAX is imported; run it as '
                       '`python -m mocojax.plan`.')
  flags = re.sub(r'--xla_force_host_platform_device_count=\d+', '', os.environ.get('XLA_FLAGS', ''))
  flags += f' --xla_force_host_platform_device_count={n}'
  if '--xla_cpu_scheduler_type' not in flags:
    # The CPU default schedules for concurrency and keeps activations alive well past their
    # last use (remat then saves nothing); the memory-optimised scheduler is the closer proxy
    # for the memory-aware schedulers of the TPU and GPU backends.
    flags += ' --xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED'
  os.environ['XLA_FLAGS'] = flags.strip()
  os.environ['JAX_PLATFORMS'] = 'cpu'


# ----------------------------------------------------------------------------------------------
# Reading the compiled program.
# ----------------------------------------------------------------------------------------------
_DTYPE_BYTES = {'pred': 1, 's8': 1, 'u8': 1, 'bf16': 2, 'f16': 2, 's16': 2, 'u16': 2, 'f32': 4,
                's32': 4, 'u32': 4, 'f64': 8, 's64': 8, 'u64': 8}


def _shape_bytes(shape_text: str) -> int:
  """Bytes of an HLO result shape such as 'f32[8,16]{1,0}' or a tuple of them."""
  total = 0
  for dtype, dims in re.findall(r'(\w+)\[([\d,]*)\]', shape_text):
    n = 1
    for d in dims.split(','):
      if d:
        n *= int(d)
    total += n * _DTYPE_BYTES.get(dtype, 4)
  return total


def collectives(hlo_text: str) -> dict:
  """{op: (count, bytes of results)} of the collectives in compiled HLO text, per device.

  An async pair (op-start / op-done) counts once, at its start.
  """
  out = {op: [0, 0] for op in COLLECTIVES}
  for m in re.finditer(r'= (.*?) (' + '|'.join(COLLECTIVES) + r')(-start)?\(', hlo_text):
    out[m.group(2)][0] += 1
    out[m.group(2)][1] += _shape_bytes(m.group(1))
  return {op: tuple(v) for op, v in out.items()}


def flops(cost) -> float:
  """'flops' of a cost analysis: a dict, or (older JAX) a list of dicts."""
  cost = [cost] if isinstance(cost, dict) else (cost or [])
  return float(sum(d.get('flops', 0.0) for d in cost if d))


def state_bytes_per_device(abstract_state) -> dict:
  """Bytes per device of each part of the train state, from shapes and shardings alone
  (`abstract_state`: ShapeDtypeStructs carrying their shardings)."""
  import jax
  import numpy as np
  out = {}
  for field in abstract_state.__dataclass_fields__:
    total = 0
    for leaf in jax.tree.leaves(getattr(abstract_state, field)):
      if not hasattr(leaf, 'dtype') or jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        continue
      shard = leaf.sharding.shard_shape(leaf.shape)
      total += int(np.prod(shard)) * leaf.dtype.itemsize
    out[field] = total
  return out


# ----------------------------------------------------------------------------------------------
# The plan.
# ----------------------------------------------------------------------------------------------
def plan(config, num_classes: int = 1000, channels: int = 3) -> dict:
  """Compiles the train step of `config` for every present device; returns the figures."""
  import time

  import jax
  import jax.numpy as jnp
  from mocojax import parallel
  from mocojax import step as step_lib

  n = jax.device_count()
  parallel.check_batch_size(config.batch_size)
  mesh = parallel.make_mesh(tuple(tuple(a) for a in config.mesh))
  steps_per_epoch = IMAGENET_TRAIN_IMAGES // config.batch_size
  setup = step_lib.setup(config, mesh, steps_per_epoch, channels, num_classes)
  total_steps, state, step = setup.total_steps, setup.abstract_state, setup.step
  size, data = config.data.image_size, setup.batch_sharding
  b = config.batch_size
  batch = {v: jax.ShapeDtypeStruct((b, size, size, channels), jnp.float32, sharding=data)
           for v in ('view1', 'view2')}
  if state.probe is not None:
    batch['label'] = jax.ShapeDtypeStruct((b,), jnp.int32, sharding=data)

  t0 = time.time()
  lowered = step.lower(state, batch)
  t1 = time.time()
  compiled = lowered.compile()
  t2 = time.time()

  memory = compiled.memory_analysis()
  mem = {k: int(getattr(memory, f'{k}_size_in_bytes', 0) or 0)
         for k in ('argument', 'output', 'alias', 'temp', 'generated_code')}
  per_device_flops = flops(compiled.cost_analysis())
  return dict(
      devices=n, mesh=dict(mesh.shape), batch=b, steps_per_epoch=steps_per_epoch,
      total_steps=total_steps, epochs=config.epochs, dtype=config.get('dtype', 'float32'),
      remat=bool(config.model.get('remat', False)),
      state=state_bytes_per_device(state),
      batch_bytes=2 * b * size * size * channels * 4 // n, memory=mem,
      flops_per_device=per_device_flops, flops_global_unpartitioned=flops(lowered.cost_analysis()),
      collectives=collectives(compiled.as_text()), lower_s=t1 - t0, compile_s=t2 - t1)


def step_time(p: dict, peak_tflops: float, mfu: float) -> float:
  """Seconds per step on p['devices'] chips of `peak_tflops` running at `mfu`."""
  return p['flops_per_device'] / (peak_tflops * 1e12 * mfu)


def report(p: dict, name: str, peak_tflops=None, mfu: float = 0.4) -> str:
  gib = lambda x: f'{x / 2**30:8.2f} GiB'
  s, m = p['state'], p['memory']
  params = s['params'] + s['momentum_params']
  other = sum(v for k, v in s.items() if k not in ('params', 'momentum_params', 'opt_state'))
  mesh = ' x '.join(f'{k}={v}' for k, v in p['mesh'].items())
  total = m['argument'] + m['temp'] + m['output'] - m['alias']
  global_tflop = p['flops_per_device'] * p['devices'] / 1e12
  lines = [
      f'{name}: global batch {p["batch"]}, {p["devices"]} devices (mesh {mesh}), '
      f'dtype {p["dtype"]}, remat {p["remat"]}',
      f'  lower {p["lower_s"]:.1f} s, compile {p["compile_s"]:.1f} s (CPU)',
      '  per device, state from the shardings:',
      f'    parameters (base + momentum)   {gib(params)}',
      f'    optimizer state                {gib(s["opt_state"])}',
      f'    other state (BN, probe, ...)   {gib(other)}',
      f'    input batch (2 views, f32)     {gib(p["batch_bytes"])}',
      '  per device, XLA memory analysis (CPU compile: indicative, not TPU/GPU memory):',
      f'    arguments                      {gib(m["argument"])}',
      f'    temporaries                    {gib(m["temp"])}',
      f'    outputs not aliased to inputs  {gib(m["output"] - m["alias"])}',
      f'    total                          {gib(total)}',
      KNOWN_BIAS,
      f'  FLOPs per step: {global_tflop:,.1f} TFLOP over all devices '
      f'({p["flops_per_device"] / 1e12:,.2f} TFLOP per device; XLA\'s count before partitioning: '
      f'{p["flops_global_unpartitioned"] / 1e12:,.1f} TFLOP)',
      '  collectives per step and device (count, bytes of results):',
  ]
  for op, (count, nbytes) in p['collectives'].items():
    lines.append(f'    {op:20s} {count:5d}  {nbytes / 2**20:10.1f} MiB')
  peaks = [('stated', peak_tflops)] if peak_tflops else list(REFERENCE_PEAKS)
  lines.append(f'  time at {mfu:.0%} MFU ({p["steps_per_epoch"]} steps/epoch, '
               f'{p["epochs"]:g} epochs = {p["total_steps"]} steps):')
  for chip, peak in peaks:
    t = step_time(p, peak, mfu)
    lines.append(f'    {chip:9s} {peak:6.0f} TFLOP/s/chip: {t * 1e3:9.1f} ms/step, '
                 f'{t * p["total_steps"] / 3600:8.1f} h for the run')
  return '\n'.join(lines)


def main(argv):
  from absl import flags
  from ml_collections import config_flags
  config_flag = config_flags.DEFINE_config_file('config', 'configs/mocov3_vit_base.py',
                                                'Training config file.', lock_config=True)
  flags.DEFINE_integer('devices', 8, 'Virtual devices to compile for.')
  batch = flags.DEFINE_integer('batch', None, 'Global batch (default: the config\'s).')
  dtype = flags.DEFINE_enum('dtype', None, ['float32', 'bfloat16'], 'config.dtype (compute).')
  fsdp = flags.DEFINE_integer('fsdp', None, 'Mesh data x fsdp=K instead of config.mesh.')
  peak = flags.DEFINE_float('platform_peak_tflops', None,
                            'Peak TFLOP/s per chip; default: a table of common chips.')
  mfu = flags.DEFINE_float('mfu', 0.4, 'Model FLOP utilisation assumed for the time estimate.')
  # --platform-peak-tflops as in the docs: absl only knows the underscore spelling.
  dashed = lambda m: '--' + m.group(1).replace('-', '_')
  argv = [re.sub(r'^--([a-z]+(?:-[a-z]+)+)(?==|$)', dashed, a) for a in argv]
  flags.FLAGS(argv)
  config = config_flag.value
  with config.unlocked():
    if batch.value:
      config.batch_size = batch.value
    if dtype.value:
      config.dtype = dtype.value
    if fsdp.value and fsdp.value > 1:
      config.mesh = (('data', -1), ('fsdp', fsdp.value))
  name = os.path.splitext(os.path.basename(flags.FLAGS['config'].config_filename))[0]
  print(report(plan(config), name, peak.value, mfu.value), flush=True)


if __name__ == '__main__':
  _set_device_count(_devices_from_argv(sys.argv))
  main(sys.argv)
