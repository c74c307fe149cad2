r"""Throughput, FLOPs, MFU and memory of the full MoCo v3 train step.

What is measured: the jitted `train_step` exactly as the trainer builds it
(`step.setup(config, mesh, steps_per_epoch, channels[, num_classes])`: `jax.jit` with the state
donated and laid out as the trainer lays it out, and the batch split by
`parallel.batch_sharding` over `parallel.make_mesh()`, i.e. every present device), run on
synthetic batches that already live on the devices. On the configs' default mesh
(('data', -1)) the state is replicated. The input pipeline (decoding, augmentation,
host-to-device copies) is therefore NOT part of the figures. Where the trainer trains an online
linear probe alongside (config.online_probe.enabled and a labelled dataset), so does the bench,
with the dataset's number of classes (10 for demo, 1000 for ImageNet).

Per model it prints: global batch, devices, lower and compile time, step time (median of
--steps timed steps after --warmup untimed ones, each ended by block_until_ready), images/s
(one image = one two-view sample), FLOPs per step from XLA's cost analysis next to an analytic
estimate, achieved TFLOP/s, MFU against a stated peak, peak device memory and XLA's compiled
memory analysis.

  # CPU, the two default models (ViT-S/16 at 224 px, global batch 8):
  python bench/train_step.py --models=demo,vit_small --batch=8 --steps=5

  # One accelerator, bf16 compute, a batch that fills it better:
  python bench/train_step.py --models=vit_small --batch=256 --dtype=bfloat16 --steps=20

  # An accelerator missing from the table below, or a different peak:
  python bench/train_step.py --models=vit_small --batch=128 --peak_tflops=312

Models: `demo` is configs/demo.py at its own batch (256, 28 px, 1 channel); `vit_small` and
`vit_base` are configs/mocov3_vit_{small,base}.py at 224 px with global batch --batch (must
divide by the devices).
`--dtype=bfloat16` sets `config.dtype`, the compute dtype of the modules; parameters,
optimizer state and the input batch stay float32, as in training.

FLOP counts. `compiled.cost_analysis()['flops']` describes the program one device runs: for a
jit partitioned over n devices it is the per-device share, so the step's total is it times n
(`lowered.cost_analysis()`, taken before partitioning, gives the global count directly and is
printed as a check). XLA counts a matmul as 2*M*N*K and every elementwise op as one FLOP per
element, so it sits a little above the analytic matmul-only estimate. The analytic estimate:
per image and ViT forward, patch projection 2*P*(p*p*C)*D, and per block 24*N*D^2 (qkv, proj,
fc1, fc2: 2 x params x tokens) plus attention 4*N^2*D, N = P + 1 tokens; MLP heads 2 x
in x out per layer. A step is, for each of the 2 views, the base encoder forward + backward
(3x its forward; the frozen patch projection has no backward) plus the momentum encoder forward
(1x, no predictor), plus the v3 loss (q k^T over the global batch and its gradient for q),
plus, when present, the online probe (a D x classes matmul on view 1 and its weight gradient).
The EMA and optimizer updates (O(params)) are left out of the estimate.

Levers one at a time: `--set` overrides any config setting, each value read as the type of
the setting it replaces, e.g. `--set=model.attention=cudnn,model.remat=True`. `--compile_only`
lowers and compiles the same step on abstract inputs (nothing is allocated, nothing runs) and
prints XLA's compiled memory analysis and what the compiled program is made of; on the CPU
backend it compiles with XLA's memory-optimised scheduler, as mocojax.plan does (the default
one keeps activations alive for concurrency, so remat and smaller residuals barely show):

  python bench/train_step.py --models=vit_base --batch=64 --dtype=bfloat16 --compile_only \
      --set=model.attention=einsum,model.softmax_residual=float32

MFU = achieved TFLOP/s (XLA count) / (devices x peak per device). The peak comes from
--peak_tflops, else from a table of dense bf16 peaks keyed on `device.device_kind`; float32
runs are also compared against the bf16 peak. On CPU no peak is known and MFU is not printed.
"""

import ast
import collections
import math
import os
import re
import statistics
import sys
import time

# Runnable as `python bench/train_step.py` from anywhere: the repository root holds the
# `mocojax` and `configs` packages.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)

from absl import app, flags  # noqa: E402

_MODELS = flags.DEFINE_list(
    'models', ['demo', 'vit_small'],
    'Models to measure: demo, vit_small, vit_base, or the name of any module in configs/ (e.g. '
    'mocov2_resnet50, mocov3_resnet50, demo_mocov1).')
_BATCH = flags.DEFINE_integer(
    'batch', 8, 'Global batch of the ImageNet configs (vit_small, *_resnet50); the Fashion-MNIST '
    'demos keep their config batch unless --batch is given.')
_DTYPE = flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'],
                           'Compute dtype of the modules (config.dtype).')
_STEPS = flags.DEFINE_integer('steps', 5, 'Timed steps; the step time is their median.')
_WARMUP = flags.DEFINE_integer('warmup', 2, 'Untimed steps run after compiling, before timing.')
_PEAK = flags.DEFINE_float('peak_tflops', None,
                           'Peak TFLOP/s per device for MFU; default: table by device kind.')
_SET = flags.DEFINE_string(
    'set', '', 'Config overrides key=value, comma-separated, applied after --batch and '
    '--dtype, e.g. model.attention=cudnn,model.remat=True; a value is read as the type of the '
    'setting it replaces (tuples as Python literals).')
_COMPILE_ONLY = flags.DEFINE_bool(
    'compile_only', False, 'Lower and compile the step on abstract inputs and print its '
    'compiled memory and op counts; run nothing.')

# Dense bf16 peak TFLOP/s per device. Matched as substrings of device_kind, lower-cased, in
# this order (so 'tpu v5 lite' is found before 'tpu v5').
PEAK_TFLOPS = (
    ('h200', 989.0),
    ('h100 pcie', 756.0),
    ('h100', 989.0),        # SXM
    ('a100', 312.0),
    ('tpu v5 lite', 197.0),  # v5e
    ('tpu v5e', 197.0),
    ('tpu v5p', 459.0),
    ('tpu v5', 459.0),       # v5p reports 'TPU v5'
    ('tpu v4', 275.0),
)

ALIASES = {'vit_small': 'mocov3_vit_small', 'vit_base': 'mocov3_vit_base'}


def dataset_shape(config):
  """(train examples, channels, classes): only for a steps-per-epoch and the input shape."""
  if config.data.source == 'idx':
    return 60_000, 1, 10        # Fashion-MNIST demos
  return 1_281_167, 3, 1000     # ImageNet recipes


def load_config(name: str, batch: int, dtype: str):
  import importlib
  module = ALIASES.get(name, name)
  try:
    config = importlib.import_module(f'configs.{module}').get_config()
  except ModuleNotFoundError:
    raise ValueError(f'--models: unknown model {name!r}; use demo, vit_small or a module name '
                     f'from configs/ (e.g. mocov3_resnet50).') from None
  if config.data.source != 'idx':   # the ImageNet recipes run at 224 px and --batch
    config.batch_size = batch
    config.data.image_size = 224
  elif _BATCH.present:
    config.batch_size = batch
    if 'queue_size' in config:       # the queue must stay a multiple of the keys per step
      config.queue_size = max(config.queue_size // batch, 1) * batch
  if dtype != 'float32':
    if 'dtype' not in config:
      raise ValueError(f'{name}: the config has no dtype field, so --dtype={dtype} cannot apply.')
    config.dtype = dtype
  return config


def split_overrides(text: str) -> list:
  """'a.b=1,c=(1, 2)' -> ['a.b=1', 'c=(1, 2)']: a comma starts a new override only when a
  `key=` follows it, so tuple values keep theirs."""
  return [part for part in re.split(r',(?=\s*[\w.]+=)', text) if part.strip()]


def _parse_value(text: str, kind):
  if kind is str:
    return text
  if kind is bool:
    if text.lower() not in ('true', 'false'):
      raise ValueError(f'{text!r} is not True or False')
    return text.lower() == 'true'
  if kind in (int, float):
    return None if text == 'None' else kind(text)
  return ast.literal_eval(text)   # tuples, lists, None-valued settings


def apply_overrides(config, overrides: list) -> None:
  """Sets each 'dotted.key=value' of `overrides`; a value is read as the setting's type
  (ml_collections' `get_type`, which knows the type of a None placeholder too)."""
  from mocojax import validate
  for item in overrides:
    key, sep, text = (part.strip() for part in item.partition('='))
    if not sep:
      raise app.UsageError(f'--set: {item!r} is not key=value.')
    unknown = validate.unknown_key(config, key)
    if unknown:
      raise app.UsageError(f'--set: {unknown}')
    *groups, leaf = key.split('.')
    node = config
    for group in groups:
      node = node[group]
    kind = node.get_type(leaf)
    try:
      node[leaf] = _parse_value(text, kind)
    except (ValueError, TypeError, SyntaxError) as e:
      raise app.UsageError(f'--set: config.{key} is a {kind.__name__} setting; {text!r} does '
                           f'not read as one ({e}).') from None


# ----------------------------------------------------------------------------------------------
# Analytic FLOPs.
# ----------------------------------------------------------------------------------------------
def _mlp_flops(num_layers: int, in_dim: int, hidden: int, out: int) -> int:
  dims = [in_dim] + [hidden] * (num_layers - 1) + [out]
  return sum(2 * a * b for a, b in zip(dims[:-1], dims[1:]))


def analytic_flops(config, channels: int, probe_classes: int = 0) -> dict:
  """Matmul/conv FLOPs of one step over the global batch, and the per-image parts."""
  if config.model.name == 'resnet':
    return _resnet_step_flops(config, channels, probe_classes)
  return _vit_step_flops(config, channels, probe_classes)


def resnet_forward_flops(depth: int, width: float, small_stem: bool, size: int,
                         channels: int) -> int:
  """Conv FLOPs (2 x MACs) of one torchvision-layout ResNet forward on one image.

  ResNet-50 at 224 px gives 8.18 GFLOP, the usual "4.1 GMACs".
  """
  from mocojax.models import resnet as resnet_lib
  kind, counts = resnet_lib.stages(depth)
  base = resnet_lib.base_width(width)
  conv = lambda h, k, cin, cout: 2 * h * h * k * k * cin * cout
  if small_stem:
    h = size
    total = conv(h, 3, channels, base)
  else:
    h = -(-size // 2)
    total = conv(h, 7, channels, base)
    h = -(-h // 2)                                     # max-pool
  cin = base
  for stage, n in enumerate(counts):
    planes = base * 2**stage
    for i in range(n):
      stride = 2 if stage > 0 and i == 0 else 1
      out_h = -(-h // stride)
      if kind == 'basic':
        cout = planes
        total += conv(out_h, 3, cin, planes) + conv(out_h, 3, planes, planes)
      else:
        cout = planes * 4                              # v1.5: the stride is on the 3x3
        total += (conv(h, 1, cin, planes) + conv(out_h, 3, planes, planes)
                  + conv(out_h, 1, planes, cout))
      if stride != 1 or cin != cout:
        total += conv(out_h, 1, cin, cout)             # downsample shortcut
      cin, h = cout, out_h
  return total


def _resnet_step_flops(config, channels: int, probe_classes: int) -> dict:
  from mocojax.models import resnet as resnet_lib
  m, h, b = config.model, config.head, config.batch_size
  feat = resnet_lib.feature_dim(m.depth, m.width)
  backbone = resnet_forward_flops(m.depth, m.width, m.small_stem, config.data.image_size,
                                  channels)
  if config.method not in ('mocov1', 'mocov2'):  # two views through both encoders
    proj = _mlp_flops(h.proj_layers, feat, h.hidden_dim, h.out_dim)
    pred = _predictor_flops(config)
    per_image = 2 * (3 * (backbone + proj + pred) + _momentum(config) * (backbone + proj))
    loss = _loss_flops(config)
  else:   # v1/v2: query fwd + bwd, key fwd; symmetric doubles both
    proj = _mlp_flops(2 if h.mlp else 1, feat, feat, h.out_dim)
    pred = 0
    views = 2 if config.get('symmetric', False) else 1
    per_image = views * (3 * (backbone + proj) + backbone + proj)
    # q . [k+, queue] over K + 1 keys, forward and the gradient for q, per query view.
    loss = views * 2 * (2 * b * (config.queue_size + 1) * h.out_dim)
  probe = 2 * (2 * feat * probe_classes)
  return dict(kind='resnet', width=feat, backbone=backbone, proj=proj, pred=pred, probe=probe,
              per_image_step=per_image, step=b * (per_image + probe) + loss)


def _predictor_flops(config) -> int:
  h = config.head
  return _mlp_flops(h.pred_layers, h.out_dim, h.hidden_dim, h.out_dim) if 'pred_layers' in h else 0


def _momentum(config) -> int:
  """1 if the method runs a momentum encoder (forward only), else 0."""
  from mocojax import methods
  return int(methods.method_class(config).has_momentum_encoder)


def _loss_flops(config) -> int:
  """Similarity matmuls of the two-view losses over the global batch, forward and backward."""
  b, d = config.batch_size, config.head.out_dim
  if config.method == 'simclr':  # [2B, 2B] similarities; the gradient reaches both operands
    return 3 * (2 * (2 * b) ** 2 * d)
  if config.method == 'byol':    # cosines of matching rows only
    return 0
  return 2 * (2 * b * b * d) * 2  # v3: 2 terms x (q k^T fwd + grad of q)


def _vit_step_flops(config, channels: int, probe_classes: int) -> dict:
  from mocojax.models import vit as vit_lib
  m = config.model
  width, depth, _ = vit_lib.SIZES.get(m.variant, (None, None, None))
  width, depth = m.get('width') or width, m.get('depth') or depth
  mlp_ratio = vit_lib.Block.mlp_ratio
  s, p, c = config.data.image_size, m.patch_size, channels
  patches = (s // p) ** 2
  n = patches + 1
  patch = 2 * patches * p * p * c * width
  block_matmul = 2 * n * width * (4 * width + 2 * int(mlp_ratio * width))  # 24 N D^2 at ratio 4
  block_attn = 4 * n * n * width
  blocks = depth * (block_matmul + block_attn)
  h = config.head
  proj = _mlp_flops(h.proj_layers, width, h.hidden_dim, h.out_dim)
  pred = _predictor_flops(config)
  b = config.batch_size
  per_image = 2 * (patch + 3 * (blocks + proj + pred)    # base: fwd + bwd; patch frozen
                   + _momentum(config) * (patch + blocks + proj))  # momentum: fwd only
  loss = _loss_flops(config)
  probe = 2 * (2 * width * probe_classes)                 # fwd + weight gradient, view 1
  return dict(kind='vit', tokens=n, width=width, depth=depth, patch=patch, blocks=blocks,
              attention=depth * block_attn, proj=proj, pred=pred, probe=probe,
              vit_forward=patch + blocks, per_image_step=per_image,
              step=b * (per_image + probe) + loss)


# ----------------------------------------------------------------------------------------------
# Helpers for what the backend reports.
# ----------------------------------------------------------------------------------------------
def flops_of(cost):
  """'flops' of a cost analysis: a dict, or (older JAX) a list of dicts, one per HLO module."""
  if cost is None:
    return None
  if isinstance(cost, dict):
    cost = [cost]
  values = [d.get('flops') for d in cost if d]
  values = [v for v in values if v is not None and v > 0]
  return float(sum(values)) if values else None


def peak_tflops(device):
  """(per-device peak, where it came from) or (None, reason)."""
  if _PEAK.value:
    return _PEAK.value, '--peak_tflops'
  kind = device.device_kind.lower()
  for key, value in PEAK_TFLOPS:
    if key in kind:
      return value, f'table: {device.device_kind!r} -> {value:g} (dense bf16)'
  return None, f'peak unknown for {device.device_kind!r} ({device.platform}); pass --peak_tflops'


def peak_memory(devices):
  stats = [d.memory_stats() for d in devices]
  peaks = [s.get('peak_bytes_in_use') for s in stats if s]
  peaks = [p for p in peaks if p is not None]
  if not peaks:
    return None
  limits = [s.get('bytes_limit') for s in stats if s and s.get('bytes_limit')]
  return max(peaks), (max(limits) if limits else None)


_DTYPE_BYTES = {'pred': 1, 's8': 1, 'u8': 1, 'f8e4m3fn': 1, 'f8e5m2': 1, 'bf16': 2, 'f16': 2,
                's16': 2, 'u16': 2, 'f32': 4, 's32': 4, 'u32': 4, 'f64': 8, 's64': 8, 'u64': 8}
_INSTRUCTION = re.compile(r'^\s*(?:ROOT )?%\S+ = (\(.*?\)|\S+) ([\w-]+)\(')
# Results that are views or bookkeeping, not buffers of their own.
_NO_BUFFER = ('parameter', 'constant', 'get-tuple-element', 'tuple', 'bitcast')


def _shape_bytes(shape: str) -> int:
  total = 0
  for dtype, dims in re.findall(r'(\w+)\[([\d,]*)\]', shape):
    total += math.prod(int(d) for d in dims.split(',') if d) * _DTYPE_BYTES.get(dtype, 4)
  return total


def hlo_summary(hlo_text: str, largest: int = 5) -> dict:
  """What a compiled module is made of: counts of its unfused ops by opcode, of its
  custom-call targets (cuBLAS, cuDNN attention, ...), and its largest op results by shape.

  Ops inside fusions are not counted: a fusion is one kernel and materialises only its
  result. The largest results say which arrays the program writes out (e.g. [B, heads, N, N]
  attention probabilities), not how long they live: that is the memory analysis's job.
  """
  fused = set(re.findall(r' fusion\(.*?calls=(%[\w.\-]+)', hlo_text))
  ops, targets, results = collections.Counter(), collections.Counter(), collections.Counter()
  skip = False
  for line in hlo_text.splitlines():
    header = re.match(r'^(?:ENTRY )?(%[\w.\-]+) .*\{$', line)
    if header:
      skip = header.group(1) in fused
      continue
    m = None if skip else _INSTRUCTION.match(line)
    if not m:
      continue
    shape, op = m.groups()
    ops[op] += 1
    if op == 'custom-call':
      target = re.search(r'custom_call_target="([^"]+)"', line)
      targets[target.group(1) if target else '?'] += 1
    if op not in _NO_BUFFER:
      results[re.sub(r'\{[^}]*\}', '', shape)] += 1
  top = sorted(results, key=lambda shape: -_shape_bytes(shape))[:largest]
  return dict(ops=ops, custom_calls=targets,
              largest=[(shape, results[shape], _shape_bytes(shape)) for shape in top])


def print_hlo_summary(summary: dict) -> None:
  ops = summary['ops']
  print(f'  compiled program    {sum(ops.values()):,} unfused ops: {ops["fusion"]:,} fusions, '
        f'{ops["custom-call"]:,} custom-calls, {ops["dot"] + ops["convolution"]:,} unfused '
        f'dots/convolutions, {ops["copy"] + ops["transpose"]:,} copies/transposes, '
        f'{ops["while"]:,} loops')
  if summary['custom_calls']:
    print('    custom-call targets: ' + ', '.join(
        f'{t} x{n}' for t, n in summary['custom_calls'].most_common()))
  print('    largest op results: ' + '; '.join(
      f'{shape} x{n} ({mib(nbytes)} each)' for shape, n, nbytes in summary['largest']))


def memory_fields(mem) -> dict:
  """Bytes per device of a compiled memory analysis, and their total as live at once."""
  fields = {k: int(getattr(mem, f'{k}_size_in_bytes', 0) or 0)
            for k in ('argument', 'output', 'alias', 'temp', 'generated_code')}
  fields['total'] = (fields['argument'] + fields['output'] - fields['alias'] + fields['temp']
                     + fields['generated_code'])
  fields['xla_peak'] = int(getattr(mem, 'peak_memory_in_bytes', 0) or 0)
  return fields


def mib(x) -> str:
  return f'{x / 2**20:,.1f} MiB'


def rate(x: float) -> str:
  return f'{x:,.1f}' if x >= 10 else f'{x:.3f}'


def gflop(x) -> str:
  """FLOPs in GFLOP, or MFLOP below one GFLOP (the demo's per-image parts)."""
  if x is None:
    return 'n/a'
  return f'{x / 1e9:,.2f} GFLOP' if x >= 1e9 else f'{x / 1e6:,.2f} MFLOP'


# ----------------------------------------------------------------------------------------------
# One model.
# ----------------------------------------------------------------------------------------------
def measure(name: str) -> dict:
  import jax
  import jax.numpy as jnp

  from mocojax import parallel, validate
  from mocojax import step as step_lib

  config = load_config(name, _BATCH.value, _DTYPE.value)
  overrides = split_overrides(_SET.value)
  apply_overrides(config, overrides)
  validate.check(config)
  label = f'{name} [{", ".join(overrides)}]' if overrides else name
  train_examples, channels, num_classes = dataset_shape(config)
  steps_per_epoch = max(1, train_examples // config.batch_size)
  size = config.data.image_size
  b = config.batch_size

  # Exactly the trainer's program (step.setup): state created sharded, the step wrapped by
  # gather_parameters, jitted with the state donated and the metrics replicated.
  mesh = parallel.make_mesh(tuple(tuple(a) for a in config.mesh))
  setup = step_lib.setup(config, mesh, steps_per_epoch, channels, num_classes)
  if _COMPILE_ONLY.value:
    return compile_only(label, config, setup, channels, num_classes)
  data_sharding = setup.batch_sharding
  state = setup.init(jax.random.key(config.seed))
  train_step_jit = setup.step
  has_probe = getattr(state, 'probe', None) is not None
  leaves = jax.tree.leaves(state)
  n_split = sum(not x.sharding.is_fully_replicated for x in leaves)
  layout = ('replicated' if not n_split else
            f'{n_split} of {len(leaves)} leaves sharded by config.sharding_rules')

  # Synthetic batches made on the devices, laid out as pipeline.device_batches lays them out
  # ({'view1', 'view2'} float32 [B, S, S, C] and 'label' int32 [B]); two, used in turn.
  def make_batch(key):
    k1, k2, k3 = jax.random.split(key, 3)
    shape = (b, size, size, channels)
    return dict(view1=jax.random.normal(k1, shape, jnp.float32),
                view2=jax.random.normal(k2, shape, jnp.float32),
                label=jax.random.randint(k3, (b,), 0, num_classes, jnp.int32))

  batches = [jax.jit(make_batch, out_shardings=data_sharding)(jax.random.key(i))
             for i in range(2)]
  jax.block_until_ready(batches)

  t0 = time.perf_counter()
  lowered = train_step_jit.lower(state, batches[0])
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  lower_s, compile_s = t1 - t0, t2 - t1

  n_dev = mesh.size
  flops_device = flops_of(compiled.cost_analysis())
  try:
    flops_lowered = flops_of(lowered.cost_analysis())
  except Exception:  # noqa: BLE001 - not every backend/version implements it
    flops_lowered = None
  flops_step = flops_device * n_dev if flops_device is not None else flops_lowered
  mem = compiled.memory_analysis()

  # Warm up, then time each step to completion; the compiled executable is the jitted step's.
  for i in range(_WARMUP.value):
    state, metrics = compiled(state, batches[i % 2])
    jax.block_until_ready((state, metrics))
  times = []
  for i in range(_STEPS.value):
    t = time.perf_counter()
    state, metrics = compiled(state, batches[i % 2])
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - t)
  loss = float(jax.device_get(metrics['loss']))
  step_s = statistics.median(times)

  ana = analytic_flops(config, channels, num_classes if has_probe else 0)
  peak, peak_src = peak_tflops(jax.devices()[0])
  achieved = flops_step / step_s / 1e12 if flops_step else None
  achieved_ana = ana['step'] / step_s / 1e12
  mfu = achieved / (peak * n_dev) if (achieved and peak) else None
  mfu_ana = achieved_ana / (peak * n_dev) if peak else None
  dev_mem = peak_memory(mesh.devices.flat)
  num_params = sum(x.size for x in jax.tree.leaves(state.params))
  backbone_params = sum(x.size for x in jax.tree.leaves(state.params['backbone']))

  # ---- Report.
  d0 = jax.devices()[0]
  m = config.model
  if ana['kind'] == 'vit':
    model_desc = (f'ViT {ana["width"]}w x {ana["depth"]} blocks, {size} px, patch '
                  f'{m.patch_size} ({ana["tokens"]} tokens)')
  else:
    model_desc = (f'ResNet-{m.depth} width {m.width:g} ({ana["width"]}-d features), {size} px, '
                  f'{"small" if m.small_stem else "torchvision"} stem, BN {m.bn_stats}')
  print(f'\n=== {label}: {config.method} train step, {model_desc}, dtype {_DTYPE.value}')
  print('  input: synthetic batches already on device; the input pipeline is excluded')
  print(f'  backend {d0.platform}, device kind {d0.device_kind!r}; mesh {dict(mesh.shape)}; '
        f'state {layout}, donated')
  print(f'  online linear probe in the step: ' +
        (f'yes ({num_classes} classes, as the trainer)' if has_probe else 'no'))
  print(f'  parameters: {num_params / 1e6:.2f}M trained encoder (backbone {backbone_params / 1e6:.2f}M)')
  print(f'  global batch        {b} two-view samples on {n_dev} device(s) ({b // n_dev} per device)')
  print(f'  lower / compile     {lower_s:.1f} s / {compile_s:.1f} s')
  print(f'  step time           {step_s * 1e3:,.1f} ms median of {len(times)} '
        f'(min {min(times) * 1e3:,.1f}, max {max(times) * 1e3:,.1f}) after {_WARMUP.value} warmup; '
        f'final loss {loss:.4f}')
  print(f'  images/s            {rate(b / step_s)}  (one image = one two-view sample)')
  print(f'  XLA FLOPs/step      {gflop(flops_step)}  (compiled cost analysis: '
        f'{gflop(flops_device)} for the per-device program x {n_dev} device(s); '
        f'unpartitioned lowered HLO: {gflop(flops_lowered)})')
  print(f'  analytic FLOPs/step {gflop(ana["step"])}  (matmuls only; XLA/analytic = '
        + (f'{flops_step / ana["step"]:.3f})' if flops_step else 'n/a)'))
  probe_desc = f'; probe {gflop(ana["probe"])} fwd+bwd' if has_probe else ''
  if ana['kind'] == 'vit':
    print(f'    per image: ViT forward {gflop(ana["vit_forward"])} (patch proj '
          f'{gflop(ana["patch"])}, blocks {gflop(ana["blocks"])} of which attention N^2 terms '
          f'{gflop(ana["attention"])}); projector {gflop(ana["proj"])}, predictor '
          f'{gflop(ana["pred"])} forward{probe_desc}')
    print(f'    per image per step: {gflop(ana["per_image_step"])} = 2 views x (base 3x fwd '
          f'[no patch backward] + momentum 1x fwd, if any); plus the loss over the global batch')
  else:
    print(f'    per image: ResNet forward {gflop(ana["backbone"])} (convs); head '
          f'{gflop(ana["proj"])}, predictor {gflop(ana["pred"])} forward{probe_desc}')
    v1v2 = config.method in ('mocov1', 'mocov2')
    views = '2 views' if not v1v2 or config.get('symmetric', False) else '1 query view'
    print(f'    per image per step: {gflop(ana["per_image_step"])} = {views} x (query 3x fwd + '
          f'key 1x fwd); plus the loss over the batch'
          + (f' and the {config.queue_size}-key queue' if v1v2 else ''))
  print(f'  achieved            ' + (f'{achieved:.4f} TFLOP/s (XLA count); ' if achieved else '')
        + f'{achieved_ana:.4f} TFLOP/s (analytic count)')
  if peak:
    print(f'  MFU                 {100 * mfu:.2f}% (XLA count), {100 * mfu_ana:.2f}% (analytic) '
          f'of {n_dev} x {peak:g} TFLOP/s [{peak_src}]')
  else:
    print(f'  MFU                 n/a: {peak_src}')
  if dev_mem:
    lim = f' of {mib(dev_mem[1])}' if dev_mem[1] else ''
    print(f'  peak device memory  {mib(dev_mem[0])}{lim} (max over devices, since process start)')
  else:
    print(f'  peak device memory  n/a (device.memory_stats() unavailable on {d0.platform})')
  print_memory(mem, d0.platform)
  print_hlo_summary(hlo_summary(compiled.as_text()))
  return dict(name=label, batch=b, devices=n_dev, compile_s=compile_s, lower_s=lower_s,
              step_ms=step_s * 1e3, images_s=b / step_s, xla_gflop=(flops_step or 0) / 1e9,
              analytic_gflop=ana['step'] / 1e9, tflops=achieved_ana,
              # XLA's cost analysis does not count the cuBLAS/cuDNN custom calls a GPU program
              # is made of (it read 1.4% on an H200): there only the analytic count means much.
              mfu=None if d0.platform == 'gpu' else mfu, mfu_analytic=mfu_ana,
              peak_mem=dev_mem[0] if dev_mem else None,
              temp_mib=mem.temp_size_in_bytes / 2**20 if mem is not None else None)


def print_memory(mem, platform: str) -> None:
  if mem is None:
    print('  compiled memory     n/a (memory_analysis() returned None)')
    return
  m = memory_fields(mem)
  # The CPU backend reports its arguments as the peak: only other backends' estimate is shown.
  peak = (f'; XLA\'s peak estimate {mib(m["xla_peak"])}' if m['xla_peak'] and platform != 'cpu'
          else '')
  print(f'  compiled memory     arguments {mib(m["argument"])}, outputs {mib(m["output"])}, '
        f'aliased (donated) {mib(m["alias"])}, temporaries {mib(m["temp"])}, generated code '
        f'{mib(m["generated_code"])}; total {mib(m["total"])} (per device){peak}')


def compile_only(label: str, config, setup, channels: int, num_classes: int) -> dict:
  """Lowers and compiles the step on the state's and a batch's shapes; runs nothing."""
  import jax
  import jax.numpy as jnp

  b, size = config.batch_size, config.data.image_size
  data = setup.batch_sharding
  batch = {v: jax.ShapeDtypeStruct((b, size, size, channels), jnp.float32, sharding=data)
           for v in ('view1', 'view2')}
  batch['label'] = jax.ShapeDtypeStruct((b,), jnp.int32, sharding=data)  # as the timed run
  t0 = time.perf_counter()
  lowered = setup.step.lower(setup.abstract_state, batch)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  d0 = jax.devices()[0]
  m = config.model
  print(f'\n=== {label}: {config.method} train step, compiled only, {m.name} '
        f'{m.get("variant", m.get("depth"))}, {size} px, global batch {b}, dtype '
        f'{config.get("dtype", "float32")}')
  print(f'  backend {d0.platform}, device kind {d0.device_kind!r}, {jax.device_count()} '
        f'device(s); XLA_FLAGS={os.environ.get("XLA_FLAGS", "")!r}')
  print(f'  lower / compile     {t1 - t0:.1f} s / {t2 - t1:.1f} s')
  mem = compiled.memory_analysis()
  print_memory(mem, d0.platform)
  summary = hlo_summary(compiled.as_text())
  print_hlo_summary(summary)
  return dict(name=label, batch=b, devices=jax.device_count(), compile_s=t2 - t1,
              memory=memory_fields(mem) if mem is not None else None,
              fusions=summary['ops']['fusion'], custom_calls=summary['ops']['custom-call'])


def _print_memory_table(rows) -> None:
  print('\n| model | global batch | devices | compile s | arguments MiB | outputs MiB | aliased '
        'MiB | temporaries MiB | generated code MiB | total MiB | fusions | custom-calls |')
  print('|---|---|---|---|---|---|---|---|---|---|---|---|')
  for r in rows:
    m = r['memory'] or {}
    cell = lambda k: f'{m[k] / 2**20:,.1f}' if k in m else 'n/a'
    print(f'| {r["name"]} | {r["batch"]} | {r["devices"]} | {r["compile_s"]:.1f} | '
          f'{cell("argument")} | {cell("output")} | {cell("alias")} | {cell("temp")} | '
          f'{cell("generated_code")} | {cell("total")} | {r["fusions"]} | {r["custom_calls"]} |')


def main(argv):
  del argv
  if _STEPS.value < 1 or _WARMUP.value < 0:
    raise app.UsageError('--steps must be >= 1 and --warmup >= 0.')
  flags_now = os.environ.get('XLA_FLAGS', '')
  if _COMPILE_ONLY.value and '--xla_cpu_scheduler_type' not in flags_now:
    # Must be set before JAX starts its backend. It concerns the CPU backend alone (see
    # mocojax/plan.py): memory figures then come from a memory-aware schedule.
    os.environ['XLA_FLAGS'] = (
        flags_now + ' --xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED').strip()
  import jax
  runs = 'compile only' if _COMPILE_ONLY.value else (f'{_WARMUP.value} warmup + '
                                                      f'{_STEPS.value} timed steps')
  print(f'jax {jax.__version__}; {jax.device_count()} device(s): {jax.devices()[0].device_kind}; '
        f'dtype {_DTYPE.value}; {runs}')
  rows = [measure(name) for name in _MODELS.value]
  if _COMPILE_ONLY.value:
    _print_memory_table(rows)
    return
  print('\n| model | global batch | devices | compile s | step ms | images/s | XLA GFLOP/step '
        '| analytic GFLOP/step | TFLOP/s (analytic) | MFU (analytic) | MFU (XLA count; not on '
        'GPU) | temp MiB | peak device memory MiB |')
  print('|---|---|---|---|---|---|---|---|---|---|---|---|---|')
  pct = lambda x: f'{100 * x:.2f}%' if x else 'n/a'
  for r in rows:
    temp = f'{r["temp_mib"]:,.0f}' if r['temp_mib'] is not None else 'n/a'
    peak = f'{r["peak_mem"] / 2**20:,.0f}' if r['peak_mem'] is not None else 'n/a'
    print(f'| {r["name"]} | {r["batch"]} | {r["devices"]} | {r["compile_s"]:.1f} | '
          f'{r["step_ms"]:,.0f} | {rate(r["images_s"])} | {r["xla_gflop"]:,.1f} | '
          f'{r["analytic_gflop"]:,.1f} | {r["tflops"]:.4f} | {pct(r["mfu_analytic"])} | '
          f'{pct(r["mfu"])} | {temp} | {peak} |')


if __name__ == '__main__':
  app.run(main)
