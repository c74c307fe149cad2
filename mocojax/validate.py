"""Checks a pretraining config before anything reads data or compiles: `check(config)`.

Every problem found becomes one line naming the setting, what is wrong and the fix, and all of
them are raised together in one ConfigError: a run that would train on nonsense (a negative
learning rate, a crop scale the wrong way round, a mesh axis nothing shards over) or fail many
minutes in, after compiling, fails here instead, and a user fixes every setting in one go.

Nothing here reads data or imports TensorFlow; the library modules whose names it checks
against (methods, backbones, optimizers, recipes) are imported when a check runs, so that
`unknown_key`, used while the command line is parsed, stays cheap to import.
"""

import dataclasses
import difflib
import math
import numbers
import re

DTYPES = ('float32', 'bfloat16', 'float16')
SCHEDULES = ('cosine', 'steps')         # optim.learning_rate_schedule: anything else is cosine
SOURCES = ('idx', 'folder', 'tfds')     # data.sources.get_source ('arrays' is not a config)
IDX_SPLITS = ('train', 'test')          # the file pairs data.sources reads for source 'idx'
VIT_POSEMB = ('sincos2d', 'learned', 'none')
VIT_POOL = ('cls', 'gap')
# Axis names the code gives a meaning: the batch is split over every axis, and the default
# sharding rules shard parameters over 'fsdp'. Any other name would run as plain data
# parallelism while looking like something else.
MESH_AXES = ('data', 'fsdp')

_ABSENT = object()


class ConfigError(ValueError):
  """One line per problem, each naming the setting, what is wrong and the fix."""


def check(config):
  """Raises ConfigError listing every problem of a pretraining config; returns None if none."""
  _raise(problems(config))


def problems(config) -> list:
  """Every problem of the config, one line each (empty: the config is fine)."""
  p = _Problems(config)
  for section in (_run, _optimizer, _method, _model, _head, _data, _augment, _eval, _probe,
                  _mesh, _batch_split):
    section(p)
  p.extend(bn_group_problems(config))
  # A method's own checks may repeat a general one (v1/v2 check the BN groups too).
  return list(dict.fromkeys(p))


def _raise(lines):
  if lines:
    raise ConfigError('\n'.join(lines))


# ----------------------------------------------------------------------------------------------
# Values.
# ----------------------------------------------------------------------------------------------
def _lookup(config, path: str):
  node = config
  for part in path.split('.'):
    try:
      node = node[part]
    except (KeyError, TypeError, AttributeError):
      return _ABSENT
  return node


def _number(v) -> bool:
  # bool is an int to Python, but True as a learning rate is a typo, not a setting.
  return (isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v))


def _integer(v) -> bool:
  return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _positive(v) -> bool:
  return _number(v) and v > 0


def _non_negative(v) -> bool:
  return _number(v) and v >= 0


def _positive_int(v) -> bool:
  return _integer(v) and v > 0


def _probability(v) -> bool:
  return _number(v) and 0 <= v <= 1


def _beta(v) -> bool:
  return _number(v) and 0 <= v < 1


def _ordered_pair(v, hi=math.inf) -> bool:
  return (isinstance(v, (tuple, list)) and len(v) == 2 and all(_number(x) for x in v)
          and 0 < v[0] <= v[1] <= hi)


def _numbers(v) -> bool:
  return isinstance(v, (tuple, list)) and len(v) > 0 and all(_number(x) for x in v)


class _Problems(list):
  """Collects problem lines; `need` checks one setting if the config has it."""

  def __init__(self, config):
    super().__init__()
    self.config = config

  def get(self, path, default=None):
    value = _lookup(self.config, path)
    return default if value is _ABSENT else value

  def need(self, path: str, ok, rule: str, fix: str) -> bool:
    """False (and a problem line) if the setting is present and `ok(value)` fails."""
    value = _lookup(self.config, path)
    if value is _ABSENT or ok(value):
      return True
    self.add(path, value, rule, fix)
    return False

  def require(self, path: str, fix: str) -> bool:
    """False (and a problem line) if the config lacks a setting the trainer cannot do without."""
    if _lookup(self.config, path) is not _ABSENT:
      return True
    self.append(f'config.{path} is missing; {fix}.')
    return False

  def one_of(self, path: str, choices, what: str = 'is unknown') -> bool:
    return self.need(path, lambda v: v in tuple(choices), what, f'use one of {tuple(choices)}')

  def add(self, path: str, value, rule: str, fix: str = ''):
    self.append(f'config.{path}={value!r} {rule}' + (f'; {fix}.' if fix else '.'))


# ----------------------------------------------------------------------------------------------
# Sections.
# ----------------------------------------------------------------------------------------------
def _run(p):
  p.need('seed', _integer, 'must be an integer', 'e.g. 0')
  p.one_of('dtype', DTYPES, 'is not a float dtype the models compute in')
  p.need('temperature', _positive, 'must be > 0 (the logits are divided by it)',
         'e.g. 0.2 (v2, v3 ViT), 1.0 (v3 ResNet) or 0.07 (v1)')
  p.need('momentum.base', _probability, 'must be in [0, 1] (the key encoder is an EMA)',
         'e.g. 0.99 (v3) or 0.999 (v1/v2)')
  if p.require('batch_size', 'set the global batch size, e.g. 256'):
    p.need('batch_size', _positive_int, 'must be a positive integer', 'e.g. 256')

  p.need('total_steps', lambda v: v is None or _positive_int(v),
         'must be None (the run lasts config.epochs) or >= 1',
         'unset it or give the number of steps')
  if not _positive_int(p.get('total_steps')):   # optim.schedule_steps then counts epochs
    p.need('epochs', _positive, 'must be > 0', 'e.g. 100, or set config.total_steps')
  else:
    p.need('epochs', _non_negative, 'must be >= 0', 'e.g. the epochs config.total_steps stand for')
  epochs, warmup = p.get('epochs'), p.get('warmup_epochs')
  p.need('warmup_epochs', _non_negative, 'must be >= 0', 'e.g. 0 (no warmup) or 10')
  # optim.schedule_steps measures warmup against epochs (also when total_steps is set) and
  # silently cuts it to the run's length.
  if _non_negative(warmup) and _positive(epochs) and warmup > epochs:
    p.add('warmup_epochs', warmup, f'is longer than config.epochs={epochs!r}; '
          'lower it below epochs (the papers warm up for 10-40 of 100-300 epochs)')
  if p.get('optimizer.schedule', 'cosine') == 'steps' and _positive(warmup):
    p.add('warmup_epochs', warmup, "has no effect with config.optimizer.schedule='steps' "
          "(step decay has no warmup); set it to 0 or use schedule='cosine'")

  p.need('stop_after_steps', lambda v: v is None or _positive_int(v),
         'must be None (run the whole schedule) or >= 1', 'unset it or give a step count')
  p.need('log_every_steps', _positive_int, 'must be a positive integer', 'e.g. 100')
  p.need('checkpoint_every_steps', _positive_int, 'must be a positive integer', 'e.g. 1000')
  p.need('keep_checkpoints', lambda v: _integer(v) and v >= 1,
         'must be >= 1 (0 keeps no checkpoint, so a rerun cannot resume)', 'e.g. 3')
  p.need('stability.spike_factor', lambda v: _number(v) and v > 1,
         'must be > 1 (a spike is this many times a running median)', 'e.g. 5.0')
  for key in ('spike_window', 'spike_horizon'):
    p.need(f'stability.{key}', _positive_int, 'must be a positive integer', 'e.g. 100')
  p.need('stability.spike_warmup', lambda v: _integer(v) and v >= 0,
         'must be an integer >= 0', 'e.g. 10')
  p.need('stability.dip_points', _positive, 'must be > 0 (accuracy points, x 100)', 'e.g. 1.0')
  p.need('divergence.max_update_ratio', _non_negative,
         'must be >= 0 (a bound on update norm / parameter norm; 0 turns it off)', 'e.g. 1.0')
  p.need('divergence.max_param_norm_growth', lambda v: v == 0 or (_number(v) and v > 1),
         'must be > 1 (a bound on parameter norm / its step-0 value) or 0 (off)', 'e.g. 10.0')


def _optimizer(p):
  from mocojax import optim
  if p.require('optimizer.name', f'use one of {optim.OPTIMIZERS}'):
    p.one_of('optimizer.name', optim.OPTIMIZERS)
  p.need('optimizer.base_lr', _positive, 'must be > 0',
         'e.g. 1.5e-4 (AdamW) or 0.03 (SGD); the peak lr is base_lr * batch_size / 256')
  p.need('optimizer.weight_decay', _non_negative, 'must be >= 0', 'e.g. 0.1 (AdamW) or 1e-4')
  p.one_of('optimizer.schedule', SCHEDULES,
           'is unknown (the trainer would silently use cosine)')
  p.need('optimizer.b1', _beta, 'must be in [0, 1)', 'e.g. 0.9')
  p.need('optimizer.b2', _beta, 'must be in [0, 1)', 'e.g. 0.999')
  p.need('optimizer.eps', _positive, 'must be > 0', 'e.g. 1e-8')
  p.need('optimizer.momentum', _beta, 'must be in [0, 1)', 'e.g. 0.9')
  p.need('optimizer.trust_coefficient', _positive, 'must be > 0', 'e.g. 0.001')
  if p.get('optimizer.schedule') != 'steps':
    return
  decay = p.get('optimizer.decay_epochs', _ABSENT)
  if decay is _ABSENT:
    p.append("config.optimizer.decay_epochs is missing; schedule='steps' decays the lr x0.1 at "
             'these epochs, e.g. (120, 160) for 200 epochs.')
    return
  if not (_numbers(decay) and all(x > 0 for x in decay) and list(decay) == sorted(decay)):
    p.add('optimizer.decay_epochs', decay, 'must be increasing positive epochs',
          'e.g. (120, 160) for 200 epochs')
    return
  epochs = p.get('epochs')
  if p.get('total_steps') is None and _positive(epochs) and max(decay) >= epochs:
    p.add('optimizer.decay_epochs', decay, f'decays at or after config.epochs={epochs!r}, '
          'which never happens; use epochs inside the run, e.g. 60% and 80% of it')


def _method(p):
  """A registered method, and that method's own checks (methods/: `config_problems`)."""
  from mocojax import methods
  if not (p.require('method', f'use one of {methods.METHODS}')
          and p.one_of('method', methods.METHODS)):
    return
  method = methods.method_class(p.config)
  if method.has_momentum_encoder:
    p.require('momentum', f'{p.config.method} averages its momentum encoder on this schedule: '
              'set config.momentum.base and config.momentum.cosine, e.g. 0.99 and True')
  p.extend(method.config_problems(p.config))


def queue_problems(config) -> list:
  """v1/v2: the queue is a FIFO of whole steps' keys (mocov1v2.enqueue)."""
  from mocojax.methods import mocov1v2
  p = _Problems(config)
  if p.get('queue_size') is None:
    p.append('config.queue_size is missing; v1/v2 compare each query with a queue of keys from '
             'earlier steps: set it, e.g. 65536 (the papers).')
    return p
  if not p.need('queue_size', _positive_int, 'must be a positive integer',
                'e.g. 65536 (the papers) or a few thousand for small data'):
    return p
  if not _positive_int(p.get('batch_size')):
    return p
  n = mocov1v2.keys_per_step(config)
  q = config.queue_size
  if q % n:
    what = (f'2 x batch_size={config.batch_size} (symmetric: both views are enqueued)'
            if config.get('symmetric', False) else f'batch_size={config.batch_size}')
    p.add('queue_size', q, f'must be a multiple of the keys enqueued per step, {what}; '
          f'e.g. config.queue_size={max(1, q // n) * n}')
  return p


def bn_group_problems(config) -> list:
  """'group' BN (v1/v2's per-GPU BN) normalises consecutive groups of bn_group_size samples."""
  p = _Problems(config)
  if p.get('model.bn_stats', 'global') != 'group':
    return p
  if not p.need('model.bn_group_size', _positive_int, 'must be a positive integer',
                'e.g. 32 (the papers: 32 images per GPU)'):
    return p
  size, batch = config.model.bn_group_size, p.get('batch_size')
  if _positive_int(batch) and batch % size:
    p.add('batch_size', batch, f'does not split into BN groups of '
          f'config.model.bn_group_size={size}; make batch_size a multiple of it')
  return p


def _model(p):
  from mocojax import models
  if not (p.require('model.name', f'use one of {models.BACKBONES}')
          and p.one_of('model.name', models.BACKBONES, 'is not a known backbone')):
    return
  if p.get('model.name') == 'vit':
    _vit(p)
  else:
    _resnet(p)


def _vit(p):
  from mocojax.models import vit
  p.one_of('model.posemb', VIT_POSEMB)
  p.one_of('model.pool', VIT_POOL)
  p.one_of('model.attention', vit.ATTENTION)
  p.one_of('model.softmax_residual', vit.SOFTMAX_RESIDUAL)
  if p.get('model.attention') == 'cudnn' and p.get('dtype') not in ('bfloat16', 'float16'):
    p.add('model.attention', 'cudnn', "needs config.dtype 'bfloat16' or 'float16' (cuDNN's "
          f"fused attention has no float32), not {p.get('dtype')!r}", "use 'auto' or 'einsum'")
  p.need('model.patch_size', _positive_int, 'must be a positive integer',
         'e.g. 16 (224-px images) or 7 (28-px)')
  variant = p.get('model.variant')
  if not p.need('model.variant', lambda v: v in vit.SIZES or v == 'custom',
                'is not a ViT size', f"use one of {tuple(vit.SIZES)} or 'custom' with "
                'model.width, model.depth and model.num_heads'):
    return
  # vit.vit: width/depth/num_heads, when set, replace the named size's.
  sizes = dict(zip(('width', 'depth', 'num_heads'), vit.SIZES.get(variant, (None,) * 3)))
  for field in sizes:
    value = p.get(f'model.{field}')
    if value is None and variant == 'custom':
      p.append(f"config.model.{field}=None must be set with config.model.variant='custom'; "
               f'give a positive integer, e.g. {dict(width=128, depth=4, num_heads=4)[field]}.')
      sizes[field] = None
    elif value is not None:
      sizes[field] = value if p.need(f'model.{field}', _positive_int,
                                     'must be a positive integer', 'e.g. 4') else None
  width, heads = sizes['width'], sizes['num_heads']
  if width and heads and width % heads:
    p.add('model.num_heads', heads, f'does not divide config.model.width={width}; use a '
          f'divisor of the width, e.g. {max(d for d in range(1, heads + 1) if width % d == 0)}')
  if width and width % 4 and p.get('model.posemb') == 'sincos2d':
    p.add('model.width', width, "must be divisible by 4 with model.posemb='sincos2d' (sin and "
          'cos of rows and columns)', f'e.g. {width // 4 * 4 or 4}')
  size, patch = p.get('data.image_size'), p.get('model.patch_size')
  if _positive_int(size) and _positive_int(patch) and size % patch:
    p.add('model.patch_size', patch, f'does not divide config.data.image_size={size}; use a '
          f'divisor of the image size, e.g. {max(d for d in range(1, patch + 1) if size % d == 0)}'
          f', or an image size that is a multiple of {patch}')


def _resnet(p):
  from mocojax.models import norm, resnet
  p.one_of('model.depth', sorted(resnet.STAGES), 'is not a ResNet depth')
  p.need('model.width', lambda v: _positive(v) and round(64 * v) >= 1,
         'must be a positive channel multiplier (64 * width channels in the stem)',
         'e.g. 1.0, or 0.25 for a CPU demo')
  p.one_of('model.bn_stats', norm.STATS)


def _head(p):
  p.need('head.out_dim', _positive_int, 'must be a positive integer',
         'e.g. 256 (v3) or 128 (v1/v2)')
  p.need('head.hidden_dim', _positive_int, 'must be a positive integer', 'e.g. 4096')
  p.need('head.proj_layers', _positive_int, 'must be >= 1', 'e.g. 3 (ViT) or 2 (ResNet)')
  p.need('head.pred_layers', _positive_int, 'must be >= 1', 'e.g. 2')


def _data(p):
  from mocojax.data import recipes
  source = p.get('data.source')
  p.one_of('data.source', SOURCES)
  if source in ('idx', 'folder') and p.get('data.data_dir') is None:
    p.append(f'config.data.data_dir=None: data.source={source!r} reads files from a folder; '
             'set data.data_dir to it.')
  if source == 'idx':
    for split in ('train_split', 'eval_split'):
      p.one_of(f'data.{split}', IDX_SPLITS, "is not a split of data.source='idx'")
  p.need('data.image_size', _positive_int, 'must be a positive integer', 'e.g. 224 or 28')
  p.one_of('data.recipe', recipes.RECIPES, 'is not an augmentation recipe')
  p.need('data.crop_scale', lambda v: _ordered_pair(v, hi=1.0),
         'must be (lo, hi) with 0 < lo <= hi <= 1 (the fraction of the image a crop covers)',
         'e.g. (0.08, 1.0) (v3) or (0.2, 1.0) (v1/v2)')
  mean_ok = p.need('data.mean', _numbers, 'must be a tuple of per-channel means',
                   'e.g. (0.485, 0.456, 0.406)')
  std_ok = p.need('data.std', lambda v: _numbers(v) and all(x > 0 for x in v),
                  'must be a tuple of positive per-channel standard deviations',
                  'e.g. (0.229, 0.224, 0.225)')
  mean, std = p.get('data.mean'), p.get('data.std')
  if mean_ok and std_ok and mean is not None and std is not None and len(mean) != len(std):
    p.add('data.std', std, f'has {len(std)} channels but config.data.mean={mean!r} has '
          f'{len(mean)}; give one mean and one std per image channel')


def _augment(p):
  from mocojax.data import recipes
  overrides = p.get('data.augment')
  if overrides is None:
    return
  fields = [f.name for f in dataclasses.fields(recipes.ViewSpec)]
  for key, value in overrides.items():
    path = f'data.augment.{key}'
    if key not in fields:
      p.add(path, value, 'is not an augmentation setting', f'use one of {tuple(fields)}')
    elif value is None:
      continue                # the recipe's value
    elif key.endswith('_p'):
      p.need(path, _probability, 'must be a probability in [0, 1]', 'e.g. 0.5')
    elif key == 'blur_sigma':
      p.need(path, _ordered_pair, 'must be (lo, hi) with 0 < lo <= hi (Gaussian blur sigma, px)',
             'e.g. (0.1, 2.0) for 224-px images')
    elif key == 'crop_ratio':
      p.need(path, _ordered_pair, 'must be (lo, hi) with 0 < lo <= hi (crop aspect ratio)',
             'e.g. (0.75, 1.3333)')
    elif key == 'jitter':
      p.need(path, lambda v: _numbers(v) and len(v) == 4 and min(v) >= 0 and v[3] <= 0.5,
             'must be (brightness, contrast, saturation, hue), all >= 0, hue <= 0.5',
             'e.g. (0.4, 0.4, 0.2, 0.1)')
    elif key == 'crop_scale':
      p.need(path, lambda v: _ordered_pair(v, hi=1.0), 'must be (lo, hi) with '
             '0 < lo <= hi <= 1', 'or better, set config.data.crop_scale')
    elif key == 'blur_kernel_size':
      p.need(path, lambda v: _positive_int(v) and v % 2, 'must be an odd positive integer',
             'e.g. 23, or None for +-3 sigma')


def _eval(p):
  p.need('eval.batch_size', _positive_int, 'must be a positive integer', 'e.g. 1024')
  p.need('eval.knn_ks', lambda v: (isinstance(v, (tuple, list)) and len(v) > 0
                                   and all(_positive_int(k) for k in v)),
         'must be a non-empty tuple of positive integers (neighbours voting)', 'e.g. (20, 200)')
  p.need('eval.knn_temperature', _positive, 'must be > 0', 'e.g. 0.07')
  p.need('eval.knn_every_epochs', _non_negative, 'must be >= 0',
         'e.g. 10, or 0 to evaluate only at the end')


def _probe(p):
  if not p.get('online_probe.enabled', False):
    return
  p.need('online_probe.lr', _positive, 'must be > 0', 'e.g. 1e-3, or disable the probe with '
         'config.online_probe.enabled=False')
  p.need('online_probe.weight_decay', _non_negative, 'must be >= 0', 'e.g. 0.0')


def _mesh(p):
  import jax
  mesh = p.get('mesh', _ABSENT)
  if mesh is _ABSENT:
    return
  if not (isinstance(mesh, (tuple, list)) and len(mesh) > 0
          and all(isinstance(a, (tuple, list)) and len(a) == 2 for a in mesh)):
    p.add('mesh', mesh, 'must be a tuple of (axis name, size) pairs',
          "e.g. (('data', -1),) or (('data', 2), ('fsdp', 4))")
    return
  names, sizes = [a[0] for a in mesh], [a[1] for a in mesh]
  unknown = [n for n in names if n not in MESH_AXES]
  if unknown:
    p.add('mesh', mesh, f'names axis {unknown[0]!r}, which nothing shards over; use axis '
          f"names from {MESH_AXES} ('data': batch only, 'fsdp': batch and parameters)")
  if 'data' not in names:
    p.add('mesh', mesh, "has no 'data' axis, over which the kNN evaluation shards features",
          "add ('data', -1), e.g. (('data', -1), ('fsdp', 4))")
  if len(set(names)) != len(names):
    p.add('mesh', mesh, 'repeats an axis name', 'give each axis once')
  if not all(_integer(s) and (s > 0 or s == -1) for s in sizes):
    p.add('mesh', mesh, 'has a size that is not a positive integer or -1',
          'use -1 for "all remaining devices"')
    return
  if sizes.count(-1) > 1:
    p.add('mesh', mesh, 'has more than one -1 axis', 'give every axis but one a size')
    return
  n, known = jax.device_count(), math.prod(s for s in sizes if s != -1)
  if (-1 in sizes and n % known) or (-1 not in sizes and known != n):
    p.add('mesh', mesh, f'does not fit the {n} devices present', 'make the sizes multiply to '
          f'{n}, or give one axis size -1')
  rules = p.get('sharding_rules', ()) or ()
  for rule in rules:
    try:
      pattern, _ = rule
      re.compile(pattern)
    except (TypeError, ValueError, re.error):
      p.add('sharding_rules', rules, f'has {rule!r}, not a (regex, rule) pair',
            "e.g. (('.*', 'fsdp'),); see mocojax/parallel.py")
      break


def _batch_split(p):
  """Batches are split over every device and host; say so before compiling."""
  from mocojax import parallel
  for path in ('batch_size', 'eval.batch_size'):
    value = p.get(path)
    if not _positive_int(value):
      continue
    try:
      parallel.check_batch_size(value, f'config.{path}')
    except ValueError as e:
      p.append(str(e))


# ----------------------------------------------------------------------------------------------
# Setting names (the command line's --config.<key>).
# ----------------------------------------------------------------------------------------------
def setting_names(config, prefix: str = '') -> list:
  """Every dotted key of a config, groups included ('optimizer', 'optimizer.base_lr', ...)."""
  names = []
  for key, value in config.items():
    names.append(prefix + key)
    if hasattr(value, 'items'):
      names.extend(setting_names(value, f'{prefix}{key}.'))
  return names


def _name_score(wrong: str, name: str) -> float:
  # A misspelt key is often a fragment of the name ('lr' of 'base_lr'): score its parts too.
  return max(difflib.SequenceMatcher(None, wrong, part).ratio()
             for part in [name] + name.split('_'))


def _closest(wrong: str, names, leaf=lambda n: n, cutoff: float = 0.6) -> list:
  """Up to 3 of `names` whose leaf scores >= cutoff (difflib's default: 0.6), best first."""
  scored = sorted((-_name_score(wrong, leaf(n)), n) for n in names)
  return [n for score, n in scored if -score >= cutoff][:3]


def unknown_key(config, key: str):
  """None if `key` ('optimizer.base_lr') is a setting of config; else one line naming the
  unknown part and the closest settings: a sibling by name ('lrr': 'base_lr'), else any setting
  by its last part ('opt.base_lr': 'optimizer.base_lr'), else the group's settings."""
  parts = re.sub(r'\[.*?\]', '', key).split('.')   # 'mesh[0]' indexes the setting 'mesh'
  node = config
  for i, part in enumerate(parts):
    if not hasattr(node, 'items'):
      where = '.'.join(parts[:i])
      return (f'config.{key} is not a setting: config.{where}={node!r} is a value, not a group; '
              f'override config.{where} itself.')
    if part not in node:
      break
    node = node[part]
  else:
    return None
  parent = '.'.join(parts[:i])
  group = f'config.{parent}' if parent else 'the config'
  names = setting_names(config)
  rest = '.'.join(parts[i + 1:])
  close = [f'{parent}.{s}' if parent else s for s in _closest(part, node.keys())]
  # The rest of the path, where it exists under the suggestion ('optimzer.base_lr').
  close = [f'{c}.{rest}' if rest and f'{c}.{rest}' in names else c for c in close]
  # Across groups only near-exact names: a loose match anywhere in the config is mostly noise.
  close = close or _closest(parts[-1], names, leaf=lambda n: n.rsplit('.', 1)[-1], cutoff=0.8)
  if close:
    hint = 'did you mean ' + ' or '.join(f'config.{c}' for c in close) + '?'
  else:
    hint = f'{group} has {", ".join(node.keys())}.'
  return f'config.{key} is not a setting ({group} has no {part!r}); {hint}'
