"""Vision Transformer as used by MoCo v3 (Chen, Xie & He, 2021).

Follows the reference ViT (timm's VisionTransformer as configured by the MoCo v3 code):
pre-norm blocks, LayerNorm eps 1e-6, exact GELU, fused qkv with bias, xavier-uniform Linear
weights with zero bias, qkv initialised as three separate D x D xavier blocks, a patch
projection initialised as a linear map with fan-in C*p*p, a [CLS] token ~ N(0, 1e-6), and a
fixed 2-D sin-cos position embedding (zero for [CLS]).

Parameter names and layouts are chosen so that they map one to one onto timm's names
(patch_embed.proj, cls_token, blocks.i.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}, norm),
which keeps an export to PyTorch a matter of transposes.
"""

import dataclasses
import functools
import math
import re
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mocojax.models.backbone import Backbone

# (width, depth, heads); "small" uses 12 heads as the MoCo v3 code does (timm's ViT-S has 6).
SIZES = {
    'tiny': (192, 12, 3),
    'small': (384, 12, 12),
    'base': (768, 12, 12),
    'large': (1024, 24, 16),
    'huge': (1280, 32, 16),
}

LN_EPS = 1e-6

# model.attention: how a block computes softmax(q k^T / sqrt(d)) v. The four agree to rounding
# (tests/test_attention.py); they differ in speed and in what the backward keeps.
#   'einsum': two einsums and a float32 softmax, the reference; XLA materialises the
#             [B, heads, N, N] probabilities and keeps them for the backward.
#   'xla':    jax.nn.dot_product_attention(implementation='xla'), the same maths as JAX writes it.
#   'cudnn':  cuDNN's fused (flash) attention on NVIDIA GPUs, bf16/fp16 only: nothing N x N
#             reaches memory. The sequence is padded for it (`padded_attention`).
#   'auto':   'cudnn' where it applies (`attention_implementation`), else 'einsum'.
ATTENTION = ('auto', 'einsum', 'xla', 'cudnn')
# model.softmax_residual: the dtype of the probabilities the einsum path keeps for the
# backward. 'compute' (`softmax_keeping_output`) keeps only the probabilities in the compute
# dtype, which the second einsum's backward needs anyway; 'float32' is autodiff's own choice,
# which keeps the float32 ones besides: in bf16, 6 bytes per [B, heads, N, N] element instead
# of 2. In float32 the same values, and gradients to rounding.
SOFTMAX_RESIDUAL = ('compute', 'float32')
# The cuDNN path pads the sequence to a multiple of this: issue 12 reports that cuDNN refuses
# the ViT's 197 tokens (196 patches + [CLS]), and 64 is its kernels' tile. 197 becomes 256,
# the padding masked out by the real lengths; the N^2 work grows 1.7x, ~3% of ViT-B's FLOPs.
# bench/gpu_check.sh measures whether a smaller multiple, or none, is taken and faster.
CUDNN_SEQ_MULTIPLE = 64


def sincos2d_position_embedding(grid_h: int, grid_w: int, width: int,
                                temperature: float = 10000.) -> np.ndarray:
  """Fixed 2-D sin-cos table of shape [grid_h * grid_w, width], patches in row-major order.

  Per patch at row y, column x: concat[sin(y w), cos(y w), sin(x w), cos(x w)] with
  w_d = 1 / temperature**(d / (width / 4)), d = 0 .. width/4 - 1. This is the ordering the
  MoCo v3 reference produces (its `meshgrid(grid_w, grid_h)` puts the row index first).
  """
  if width % 4:
    raise ValueError(f'sincos2d position embedding needs model width divisible by 4, got {width}.')
  quarter = width // 4
  omega = 1.0 / temperature**(np.arange(quarter, dtype=np.float64) / quarter)
  y, x = np.meshgrid(np.arange(grid_h), np.arange(grid_w), indexing='ij')
  out_y = y.reshape(-1)[:, None] * omega[None, :]
  out_x = x.reshape(-1)[:, None] * omega[None, :]
  table = np.concatenate([np.sin(out_y), np.cos(out_y), np.sin(out_x), np.cos(out_x)], axis=1)
  return table.astype(np.float32)


def xavier_uniform_blocks(num_blocks: int) -> Callable:
  """Xavier-uniform for a fused [D, n*D] kernel, as n separate [D, D] blocks (the reference qkv)."""

  def init(key, shape, dtype=jnp.float32):
    fan_in, fan_out = shape[0], shape[1] // num_blocks
    limit = math.sqrt(6.0 / (fan_in + fan_out))
    return jax.random.uniform(key, shape, dtype, -limit, limit)

  return init


def patch_projection_init(key, shape, dtype=jnp.float32):
  """Xavier-uniform treating the [p, p, C, D] kernel as a linear map with fan-in p*p*C."""
  fan_in, fan_out = int(np.prod(shape[:-1])), shape[-1]
  limit = math.sqrt(6.0 / (fan_in + fan_out))
  return jax.random.uniform(key, shape, dtype, -limit, limit)


def _dense(features, name, kernel_init=nn.initializers.xavier_uniform(), dtype=jnp.float32):
  return nn.Dense(features, name=name, kernel_init=kernel_init,
                  bias_init=nn.initializers.zeros, dtype=dtype)


class PatchEmbed(nn.Module):
  """Non-overlapping p x p patches -> width, as a matmul on flattened (row, col, channel) patches."""
  patch_size: int
  width: int
  frozen: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images):
    b, h, w, c = images.shape
    p = self.patch_size
    if h % p or w % p:
      raise ValueError(f'image size {h}x{w} is not divisible by model.patch_size={p}.')
    kernel = self.param('kernel', patch_projection_init, (p, p, c, self.width))
    bias = self.param('bias', nn.initializers.zeros, (self.width,))
    if self.frozen:
      # MoCo v3's "random patch projection": neither gradient nor weight decay may move it
      # (the optimizer masks it out as well, see optim.py).
      kernel, bias = jax.lax.stop_gradient(kernel), jax.lax.stop_gradient(bias)
    x = images.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    x = x.reshape(b, (h // p) * (w // p), p * p * c).astype(self.dtype)
    return x @ kernel.reshape(p * p * c, self.width).astype(self.dtype) + bias.astype(self.dtype)


# ----------------------------------------------------------------------------------------------
# Attention: q, k, v are [B, N, heads, head_dim], and so is what each function returns.
# ----------------------------------------------------------------------------------------------
@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _softmax_f32(logits, out_dtype):
  return jax.nn.softmax(logits, axis=-1).astype(out_dtype)


def _softmax_f32_fwd(logits, out_dtype):
  y = _softmax_f32(logits, out_dtype)
  return y, y


def _softmax_f32_bwd(out_dtype, y, g):
  del out_dtype
  # d softmax: y * (g - <g, y>), in float32 from the rounded y (autodiff would keep y in f32).
  y, g = y.astype(jnp.float32), g.astype(jnp.float32)
  return (y * (g - jnp.sum(g * y, axis=-1, keepdims=True)),)


_softmax_f32.defvjp(_softmax_f32_fwd, _softmax_f32_bwd)


def softmax_keeping_output(logits, out_dtype):
  """softmax over the last axis, computed in float32 and returned in `out_dtype`; the backward
  keeps only that output. Differentiating `jax.nn.softmax(logits.astype(f32)).astype(out_dtype)`
  gives the same values but keeps the float32 probabilities besides the rounded ones."""
  return _softmax_f32(logits.astype(jnp.float32), jnp.dtype(out_dtype))


def einsum_attention(q, k, v, softmax_residual: str = 'compute'):
  """The reference: logits in the compute dtype, softmax in float32."""
  logits = jnp.einsum('bqhd,bkhd->bhqk', q, k) * q.shape[-1]**-0.5
  # In float32 autodiff keeps nothing extra: the plain path is the reference, bit for bit.
  if softmax_residual == 'compute' and q.dtype != jnp.float32:
    weights = softmax_keeping_output(logits, q.dtype)
  else:
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(q.dtype)
  return jnp.einsum('bhqk,bkhd->bqhd', weights, v)


def padded_attention(q, k, v, implementation: str, multiple: int = CUDNN_SEQ_MULTIPLE):
  """`jax.nn.dot_product_attention` on the sequence zero-padded to a multiple of `multiple`.

  The real length goes in as both sequence lengths: padded keys get no weight, and padded
  query rows are sliced off, so their cotangent is zero and they change no gradient. 'xla' and
  'cudnn' run the same padding; only the kernel differs.
  """
  b, n = q.shape[:2]
  scale = q.shape[-1]**-0.5
  padded = -(-n // multiple) * multiple
  if padded == n:
    return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation=implementation)
  widths = ((0, 0), (0, padded - n), (0, 0), (0, 0))
  lengths = jnp.full((b,), n, jnp.int32)
  out = jax.nn.dot_product_attention(
      jnp.pad(q, widths), jnp.pad(k, widths), jnp.pad(v, widths), scale=scale,
      query_seq_lengths=lengths, key_value_seq_lengths=lengths, implementation=implementation)
  return out[:, :n]


def attention_implementation(setting: str, dtype, head_dim: int, backend: str = None) -> str:
  """The implementation `setting` (model.attention) stands for on `backend` (default: JAX's)."""
  if setting not in ATTENTION:
    raise ValueError(f'model.attention={setting!r} is unknown; use one of {ATTENTION}.')
  if setting != 'auto':
    return setting
  backend = backend or jax.default_backend()
  # cuDNN's fused kernel takes only half precision, and head dims that are multiples of 8 up
  # to 128 on every GPU it supports (256 from Hopper on).
  half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
  fits = head_dim % 8 == 0 and head_dim <= 128
  return 'cudnn' if backend == 'gpu' and half and fits else 'einsum'


class Attention(nn.Module):
  num_heads: int
  dtype: Any = jnp.float32
  implementation: str = 'einsum'       # model.attention
  softmax_residual: str = 'compute'    # model.softmax_residual (einsum path)

  @nn.compact
  def __call__(self, x):
    b, n, d = x.shape
    head_dim = d // self.num_heads
    qkv = _dense(3 * d, 'qkv', xavier_uniform_blocks(3), self.dtype)(x)
    # Same [3, heads, head_dim] split of the fused output as the reference, so weights transfer.
    qkv = qkv.reshape(b, n, 3, self.num_heads, head_dim)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    how = attention_implementation(self.implementation, self.dtype, head_dim)
    if how == 'einsum':
      if self.softmax_residual not in SOFTMAX_RESIDUAL:
        raise ValueError(f'model.softmax_residual={self.softmax_residual!r} is unknown; use '
                         f'one of {SOFTMAX_RESIDUAL}.')
      out = einsum_attention(q, k, v, self.softmax_residual)
    elif how == 'xla':
      out = jax.nn.dot_product_attention(q, k, v, scale=head_dim**-0.5, implementation='xla')
    else:
      out = padded_attention(q, k, v, 'cudnn')
    return _dense(d, 'proj', dtype=self.dtype)(out.reshape(b, n, d))


class Block(nn.Module):
  num_heads: int
  mlp_ratio: float = 4.0
  dtype: Any = jnp.float32
  attention: str = 'einsum'
  softmax_residual: str = 'compute'

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    y = nn.LayerNorm(epsilon=LN_EPS, name='norm1', dtype=self.dtype)(x)
    x = x + Attention(self.num_heads, self.dtype, self.attention, self.softmax_residual,
                      name='attn')(y)
    y = nn.LayerNorm(epsilon=LN_EPS, name='norm2', dtype=self.dtype)(x)
    y = _dense(int(d * self.mlp_ratio), 'fc1', dtype=self.dtype)(y)
    y = nn.gelu(y, approximate=False)
    y = _dense(d, 'fc2', dtype=self.dtype)(y)
    return x + y


class ViT(nn.Module):
  """ViT backbone returning the pooled feature [B, width] (no classification head)."""
  width: int
  depth: int
  num_heads: int
  patch_size: int = 16
  mlp_ratio: float = 4.0
  posemb: str = 'sincos2d'          # 'sincos2d' (fixed) | 'learned' | 'none'
  pool: str = 'cls'                 # 'cls' | 'gap'
  gap_norm: bool = True             # for pool='gap': LayerNorm after pooling (the paper ablates both)
  stop_grad_patch_embed: bool = False
  remat: bool = False
  attention: str = 'einsum'         # see ATTENTION
  softmax_residual: str = 'compute'  # see SOFTMAX_RESIDUAL
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images, train: bool = False):
    del train  # no dropout, no BN in the MoCo v3 ViT
    x = PatchEmbed(self.patch_size, self.width, self.stop_grad_patch_embed, self.dtype,
                   name='patch_embed')(images)
    gh, gw = images.shape[1] // self.patch_size, images.shape[2] // self.patch_size
    if self.posemb == 'sincos2d':
      x = x + jnp.asarray(sincos2d_position_embedding(gh, gw, self.width), self.dtype)
    elif self.posemb == 'learned':
      pos = self.param('pos_embed', nn.initializers.normal(0.02), (gh * gw, self.width))
      x = x + pos.astype(self.dtype)
    elif self.posemb != 'none':
      raise ValueError(f"model.posemb={self.posemb!r}: use 'sincos2d', 'learned' or 'none'.")
    # [CLS] gets no position embedding (the reference's zero pe_token).
    cls = self.param('cls_token', nn.initializers.normal(1e-6), (1, 1, self.width))
    x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, self.width)).astype(self.dtype), x], 1)

    block = nn.remat(Block) if self.remat else Block
    for i in range(self.depth):
      x = block(self.num_heads, self.mlp_ratio, self.dtype, self.attention,
                self.softmax_residual, name=f'blocks_{i}')(x)

    if self.pool == 'cls':
      return nn.LayerNorm(epsilon=LN_EPS, name='norm', dtype=self.dtype)(x)[:, 0]
    if self.pool == 'gap':
      x = x[:, 1:].mean(axis=1)
      if self.gap_norm:
        x = nn.LayerNorm(epsilon=LN_EPS, name='fc_norm', dtype=self.dtype)(x)
      return x
    raise ValueError(f"model.pool={self.pool!r}: use 'cls' or 'gap'.")


def vit(variant: str = 'small', **kwargs) -> ViT:
  """ViT of a named size; width/depth/num_heads in kwargs override the size (tiny demo models)."""
  if variant not in SIZES and variant != 'custom':
    raise ValueError(f"model.variant={variant!r} is not a ViT size; use one of {sorted(SIZES)} "
                     "or 'custom' with model.width/depth/num_heads.")
  width, depth, heads = SIZES.get(variant, (None, None, None))
  fields = {f.name for f in dataclasses.fields(ViT)}
  args = dict(width=width, depth=depth, num_heads=heads)
  args.update({k: v for k, v in kwargs.items() if k in fields and v is not None})
  if None in (args['width'], args['depth'], args['num_heads']):
    raise ValueError("model.variant='custom' needs model.width, model.depth and model.num_heads.")
  return ViT(**args)


# ----------------------------------------------------------------------------------------------
# Export to timm's VisionTransformer (the model the MoCo v3 reference builds on).
# ----------------------------------------------------------------------------------------------
_LINEARS = (('attn/qkv', 'attn.qkv'), ('attn/proj', 'attn.proj'), ('fc1', 'mlp.fc1'),
            ('fc2', 'mlp.fc2'))
_NORMS = (('norm1', 'norm1'), ('norm2', 'norm2'))


def _np(x) -> np.ndarray:
  return np.asarray(x, dtype=np.float32)


def _linear(out: dict, name: str, layer: dict) -> None:
  out[f'{name}.weight'] = _np(layer['kernel']).T
  out[f'{name}.bias'] = _np(layer['bias'])


def _layer_norm(out: dict, name: str, layer: dict) -> None:
  out[f'{name}.weight'] = _np(layer['scale'])
  out[f'{name}.bias'] = _np(layer['bias'])


def timm_kwargs(module: 'ViT', image_size: int, channels: int) -> dict:
  """Keyword arguments of timm's VisionTransformer that build the same network, headless."""
  if module.pool == 'gap' and not module.gap_norm:
    raise ValueError("pool='gap' with gap_norm=False (no final norm) has no counterpart among "
                     "timm VisionTransformer's standard arguments.")
  return dict(img_size=int(image_size), patch_size=module.patch_size, in_chans=int(channels),
              embed_dim=module.width, depth=module.depth, num_heads=module.num_heads,
              mlp_ratio=module.mlp_ratio, qkv_bias=True, class_token=True,
              global_pool='token' if module.pool == 'cls' else 'avg',
              fc_norm=module.pool == 'gap', num_classes=0)


def timm_vit_state_dict(module: 'ViT', params: dict, image_size: int) -> dict:
  """{timm name: float32 numpy array}, in the order timm's state_dict() lists them.

  ViT -> timm's VisionTransformer (the model the MoCo v3 reference builds on):
  
    ours (flax, backbone/...)             timm                          layout change
    patch_embed/kernel [p, p, C, D]       patch_embed.proj.weight       -> [D, C, p, p]
    patch_embed/bias                      patch_embed.proj.bias
    cls_token [1, 1, D]                   cls_token                     same
    (sincos table | pos_embed [N, D])     pos_embed [1, 1 + N, D]       zero row for [CLS] first
    blocks_i/norm{1,2}/{scale,bias}       blocks.i.norm{1,2}.{weight,bias}
    blocks_i/attn/qkv/kernel [D, 3D]      blocks.i.attn.qkv.weight      -> [3D, D]
    blocks_i/attn/proj                    blocks.i.attn.proj
    blocks_i/fc{1,2}                      blocks.i.mlp.fc{1,2}
    norm | fc_norm                        norm | fc_norm                (pool 'cls' | 'gap')
  
  Every Dense kernel [in, out] becomes a Linear weight [out, in]. The [CLS] token gets no position
  embedding in MoCo v3; a zero row in timm's table is the same computation. A fixed sin-cos table
  is written as timm's (learnable) pos_embed, which computes the same features.
  
  The qkv split needs no permutation: both sides read the fused output as [3, heads, head_dim].
  Note that MoCo v3's ViT-Small has 12 heads where timm's `vit_small_patch16_224` has 6; heads do
  not change any shape, so create the timm model with num_heads=12 (the `torch.kwargs` that
  export writes into model.json say so), or the features will differ.
  """
  timm_kwargs(module, image_size, channels=1)  # refuses variants timm cannot express
  p, d = module.patch_size, module.width
  grid = image_size // p
  out = {}
  out['cls_token'] = _np(params['cls_token']).reshape(1, 1, d)
  if module.posemb == 'sincos2d':
    table = sincos2d_position_embedding(grid, grid, d)
  elif module.posemb == 'learned':
    table = _np(params['pos_embed'])
    if table.shape[0] != grid * grid:
      raise ValueError(f'pos_embed has {table.shape[0]} rows but image_size={image_size} with '
                       f'patch {p} makes {grid}x{grid} patches.')
  else:  # 'none': timm always adds a table; zeros add nothing.
    table = np.zeros((grid * grid, d), np.float32)
  out['pos_embed'] = np.concatenate([np.zeros((1, d), np.float32), table])[None]
  # [p, p, C, D] (row, col, channel, out) -> conv weight [out, channel, row, col].
  out['patch_embed.proj.weight'] = _np(params['patch_embed']['kernel']).transpose(3, 2, 0, 1)
  out['patch_embed.proj.bias'] = _np(params['patch_embed']['bias'])
  for i in range(module.depth):
    block = params[f'blocks_{i}']
    _layer_norm(out, f'blocks.{i}.norm1', block['norm1'])
    _linear(out, f'blocks.{i}.attn.qkv', block['attn']['qkv'])
    _linear(out, f'blocks.{i}.attn.proj', block['attn']['proj'])
    _layer_norm(out, f'blocks.{i}.norm2', block['norm2'])
    _linear(out, f'blocks.{i}.mlp.fc1', block['fc1'])
    _linear(out, f'blocks.{i}.mlp.fc2', block['fc2'])
  if module.pool == 'cls':
    _layer_norm(out, 'norm', params['norm'])
  else:
    _layer_norm(out, 'fc_norm', params['fc_norm'])
  return {k: np.ascontiguousarray(v) for k, v in out.items()}


def _torch_export(module: ViT, variables: dict, image_size: int, channels: int):
  tensors = timm_vit_state_dict(module, variables['params'], image_size)
  return tensors, dict(library='timm', model='VisionTransformer',
                       kwargs=timm_kwargs(module, image_size, channels))


# ----------------------------------------------------------------------------------------------
# Other input sizes and layer-wise lr decay (fine-tuning).
# ----------------------------------------------------------------------------------------------
def resample_position_embedding(pos, old_grid: tuple, new_grid: tuple):
  """A learned [gh*gw, D] patch position table resampled (bicubic) to another patch grid."""
  (gh, gw), (nh, nw) = old_grid, new_grid
  if pos.shape[0] != gh * gw:
    raise ValueError(f'position table has {pos.shape[0]} rows, not {gh}x{gw}={gh * gw}.')
  if (gh, gw) == (nh, nw):
    return pos
  d = pos.shape[-1]
  grid = jnp.asarray(pos, jnp.float32).reshape(gh, gw, d)
  # Antialiased when shrinking, as timm's resample_abs_pos_embed (F.interpolate antialias=True).
  out = jax.image.resize(grid, (nh, nw, d), method='bicubic', antialias=True)
  return out.reshape(nh * nw, d).astype(pos.dtype)



def _resize_params(module: ViT, params: dict, old_size: int, new_size: int) -> dict:
  """The parameters for another input size: a learned position table resampled to the new
  patch grid (the sin-cos table is computed from the grid; nothing else depends on it)."""
  p = module.patch_size
  if new_size % p:
    raise ValueError(f'image_size={new_size} is not divisible by the patch size {p}.')
  if 'pos_embed' not in params:
    return params
  return dict(params, pos_embed=resample_position_embedding(
      params['pos_embed'], (old_size // p,) * 2, (new_size // p,) * 2))


def _layer_ids(module: ViT):
  """Layer-wise lr decay layers (BEiT / MAE fine-tuning): 0 for the patch projection, [CLS] and
  position table, i + 1 for block i, depth + 1 for the final norm and the classifier head."""
  depth = module.depth

  def layer_id(name: str) -> int:
    if re.match(r'backbone/(patch_embed|cls_token|pos_embed)(/|$)', name):
      return 0
    block = re.match(r'backbone/blocks_(\d+)/', name)
    return int(block.group(1)) + 1 if block else depth + 1
  return layer_id, depth + 1


# ----------------------------------------------------------------------------------------------
# The registry entry.
# ----------------------------------------------------------------------------------------------
def _depth(model_config) -> int:
  return model_config.get('depth') or SIZES[model_config.variant][1]


def _grad_probes(model_config) -> dict:
  # With a frozen patch projection (zero gradient) the first trained layer is the first qkv.
  first = ('backbone/blocks_0/attn/qkv' if model_config.get('stop_grad_patch_embed')
           else 'backbone/patch_embed')
  return {'first_layer': first, 'last_block': f'backbone/blocks_{_depth(model_config) - 1}'}


def _feature_name(model_config) -> str:
  pool = model_config.get('pool', 'cls')
  return ('ViT [CLS] token after the final LayerNorm' if pool == 'cls'
          else f'ViT {pool}-pooled tokens after the final LayerNorm')


BACKBONE = Backbone(
    module=ViT,
    build=lambda model_config, dtype: vit(**{**model_config.to_dict(), 'dtype': dtype}),
    feature_dim=lambda c: c.get('width') or SIZES[c.variant][0],
    grad_probes=_grad_probes,
    frozen_prefixes=lambda c: (('backbone/patch_embed',) if c.get('stop_grad_patch_embed')
                               else ()),
    feature_name=_feature_name,
    input_channels=lambda params: int(params['patch_embed']['kernel'].shape[2]),  # [p, p, C, D]
    torch_export=_torch_export,
    probe_recipe=dict(base_lr=3.0, epochs=90.0, schedule='cosine'),
    layer_ids=_layer_ids,
    resize_params=_resize_params)
