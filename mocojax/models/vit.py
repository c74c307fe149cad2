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
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# (width, depth, heads); "small" uses 12 heads as the MoCo v3 code does (timm's ViT-S has 6).
SIZES = {
    'tiny': (192, 12, 3),
    'small': (384, 12, 12),
    'base': (768, 12, 12),
    'large': (1024, 24, 16),
    'huge': (1280, 32, 16),
}

LN_EPS = 1e-6


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


class Attention(nn.Module):
  num_heads: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, n, d = x.shape
    head_dim = d // self.num_heads
    qkv = _dense(3 * d, 'qkv', xavier_uniform_blocks(3), self.dtype)(x)
    # Same [3, heads, head_dim] split of the fused output as the reference, so weights transfer.
    qkv = qkv.reshape(b, n, 3, self.num_heads, head_dim)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    logits = jnp.einsum('bqhd,bkhd->bhqk', q, k) * head_dim**-0.5
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(self.dtype)
    out = jnp.einsum('bhqk,bkhd->bqhd', weights, v).reshape(b, n, d)
    return _dense(d, 'proj', dtype=self.dtype)(out)


class Block(nn.Module):
  num_heads: int
  mlp_ratio: float = 4.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    y = nn.LayerNorm(epsilon=LN_EPS, name='norm1', dtype=self.dtype)(x)
    x = x + Attention(self.num_heads, self.dtype, name='attn')(y)
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
      x = block(self.num_heads, self.mlp_ratio, self.dtype, name=f'blocks_{i}')(x)

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
