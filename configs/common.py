"""Building blocks shared by the configs (every field a run reads is set here)."""

import ml_collections

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def mocov3_vit(variant: str = 'base', patch_size: int = 16) -> ml_collections.ConfigDict:
  """MoCo v3 ViT recipe of the paper (ImageNet, 300 epochs, batch 4096, AdamW)."""
  c = ml_collections.ConfigDict()
  c.method = 'mocov3'
  c.seed = 0
  c.dtype = 'float32'
  c.mesh = (('data', -1),)   # e.g. (('data', 2), ('fsdp', 4)) shards the parameters 4 ways
  # (regex on the parameter path, PartitionSpec-like tuple or a mesh axis name); see parallel.py.
  c.sharding_rules = (('.*', 'fsdp'),)
  c.fsdp_min_size = 2**14    # parameters with fewer elements stay replicated

  c.model = ml_collections.ConfigDict(dict(
      name='vit', variant=variant, patch_size=patch_size, posemb='sincos2d', pool='cls',
      gap_norm=True, stop_grad_patch_embed=True, remat=False,
      # How the step is computed, not what (models/vit.py ATTENTION, SOFTMAX_RESIDUAL; equal
      # paths: tests/test_attention.py). attention='einsum' is the reference; 'auto' takes
      # cuDNN's fused attention on GPUs in bf16/fp16 (the [B, heads, N, N] probabilities never
      # reach memory). It stays opt-in until bench/gpu_check.sh has run it on a GPU.
      # softmax_residual='compute': in bf16 the backward keeps the probabilities in bf16 only.
      attention='einsum', softmax_residual='compute',
      # Set width/depth/num_heads with variant='custom' for small models.
      width=ml_collections.FieldReference(None, field_type=int),
      depth=ml_collections.FieldReference(None, field_type=int),
      num_heads=ml_collections.FieldReference(None, field_type=int)))
  c.head = ml_collections.ConfigDict(dict(
      proj_layers=3, pred_layers=2, hidden_dim=4096, out_dim=256, pred_last_bn=True))
  c.temperature = 0.2
  c.momentum = ml_collections.ConfigDict(dict(base=0.99, cosine=True))

  c.batch_size = 4096
  c.epochs = 300.0
  c.warmup_epochs = 40.0
  c.total_steps = ml_collections.FieldReference(None, field_type=int)  # replaces epochs if set
  c.stop_after_steps = ml_collections.FieldReference(None, field_type=int)  # stop early, same schedule
  c.optimizer = ml_collections.ConfigDict(dict(
      name='adamw', base_lr=1.5e-4, weight_decay=0.1, b1=0.9, b2=0.999, eps=1e-8,
      momentum=0.9, trust_coefficient=0.001, schedule='cosine'))

  c.data = ml_collections.ConfigDict(dict(
      source='tfds', name='imagenet2012', data_dir=ml_collections.FieldReference(None, field_type=str),
      train_split='train', eval_split='validation', image_size=224, recipe='mocov3',
      crop_scale=(0.08, 1.0), mean=IMAGENET_MEAN, std=IMAGENET_STD,
      # Overrides of the recipe's augmentation (mocojax.data.recipes.ViewSpec fields, applied
      # to both views); None keeps the recipe's value.
      augment=ml_collections.ConfigDict(dict(
          blur_sigma=ml_collections.config_dict.placeholder(tuple),
          jitter=ml_collections.config_dict.placeholder(tuple),
          jitter_p=ml_collections.config_dict.placeholder(float),
          grayscale_p=ml_collections.config_dict.placeholder(float),
          crop_ratio=ml_collections.config_dict.placeholder(tuple)))))

  c.eval = ml_collections.ConfigDict(dict(
      knn_every_epochs=10.0, knn_at_end=True, knn_ks=(20, 200), knn_temperature=0.07,
      batch_size=1024))

  # A linear classifier on stop-gradient features, trained alongside (needs labels).
  c.online_probe = ml_collections.ConfigDict(dict(enabled=True, lr=1e-3, weight_decay=0.0))

  # The run stops, saving nothing, when one step's update is larger than max_update_ratio x the
  # parameter norm, or the parameter norm grows past max_param_norm_growth x its value at step
  # 0 (a NaN or inf in the loss or a gradient always stops it); 0 turns a guard off.
  c.divergence = ml_collections.ConfigDict(dict(max_update_ratio=1.0, max_param_norm_growth=10.0))

  # The instability alarm (stability.py): a layer group's gradient infinity-norm above
  # spike_factor x its running median is a spike (followed to the last block for
  # spike_horizon steps); a kNN top-1 more than dip_points below the best so far is a dip.
  c.stability = ml_collections.ConfigDict(dict(
      spike_factor=5.0, spike_window=100, spike_warmup=10, spike_horizon=50, dip_points=1.0))

  c.log_every_steps = 100
  c.checkpoint_every_steps = 1000
  c.keep_checkpoints = 3
  c.async_checkpointing = True
  c.plot = True
  return c


def resnet_model(depth: int = 50, **overrides) -> ml_collections.ConfigDict:
  """A torchvision ResNet backbone (models/resnet.py); overrides set any field."""
  m = ml_collections.ConfigDict(dict(
      name='resnet', depth=depth, width=1.0, small_stem=False, zero_init_residual=False,
      # 'global': BN over the whole batch (v3); 'group': over groups of bn_group_size samples
      # (v1/v2's per-GPU BN, 32 images per GPU in the papers; independent of the device count).
      bn_stats='global', bn_group_size=32))
  m.update(overrides)
  return m


def mocov1v2_resnet(version: int, depth: int = 50) -> ml_collections.ConfigDict:
  """MoCo v1 or v2 with a ResNet on ImageNet: batch 256 (8 GPUs x 32), SGD, 200 epochs.

  The run, data and evaluation fields are the ViT recipe's; everything that defines the
  method is replaced here.
  """
  if version not in (1, 2):
    raise ValueError(f'MoCo version {version}: this recipe is for v1 or v2.')
  c = mocov3_vit()
  c.method = f'mocov{version}'
  c.model = resnet_model(depth, bn_stats='group', bn_group_size=32)
  # v1: the ResNet's fc made a 128-d linear head; v2: a 2-layer MLP (hidden = feature dim).
  c.head = ml_collections.ConfigDict(dict(out_dim=128, mlp=version == 2))
  c.queue_size = 65536
  c.shuffle_bn = True       # the key encoder's BN groups are a random subset of the batch
  c.symmetric = False       # v2 option: both views as queries, both key sets enqueued
  c.temperature = 0.07 if version == 1 else 0.2
  c.momentum = ml_collections.ConfigDict(dict(base=0.999, cosine=False))

  c.batch_size = 256
  c.epochs = 200.0
  c.warmup_epochs = 0.0
  c.optimizer = ml_collections.ConfigDict(dict(
      name='sgd', base_lr=0.03, weight_decay=1e-4, momentum=0.9,
      # v1: lr x0.1 at epochs 120 and 160; v2: half-cosine to 0.
      schedule='steps' if version == 1 else 'cosine', decay_epochs=(120, 160)))
  c.data.recipe = f'mocov{version}'
  c.data.crop_scale = (0.2, 1.0)
  return c


def mocov3_resnet(depth: int = 50) -> ml_collections.ConfigDict:
  """MoCo v3 with a ResNet-50 on ImageNet: the 100-epoch recipe of the reference's CONFIG.md.

  Global (synchronised) BN everywhere, zero-init residual, projector 2048 -> 4096 -> 256 ending
  in an affine-free BN, predictor 256 -> 4096 -> 256 without a final BN, tau 1.0, LARS
  (blr 0.6, wd 1e-6, 10 warmup epochs), momentum 0.99 -> 1 (cosine), crops from 0.2.
  """
  c = mocov3_vit()
  c.model = resnet_model(depth, zero_init_residual=True, bn_stats='global')
  c.head = ml_collections.ConfigDict(dict(
      proj_layers=2, pred_layers=2, hidden_dim=4096, out_dim=256, pred_last_bn=False))
  c.temperature = 1.0
  c.momentum = ml_collections.ConfigDict(dict(base=0.99, cosine=True))
  c.batch_size = 4096
  c.epochs = 100.0
  c.warmup_epochs = 10.0
  c.optimizer = ml_collections.ConfigDict(dict(
      name='lars', base_lr=0.6, weight_decay=1e-6, momentum=0.9, trust_coefficient=0.001,
      schedule='cosine'))
  c.data.recipe = 'mocov3'
  c.data.crop_scale = (0.2, 1.0)
  return c


def simclr(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """SimCLR on a MoCo v3 config, as the v3 paper compares it (Table 4): the same backbone,
  projector, optimizer, schedule and augmentation; no momentum encoder, no predictor, NT-Xent
  with temperature 0.1."""
  c.method = 'simclr'
  c.temperature = 0.1
  del c.momentum            # nothing is averaged
  del c.head.pred_layers    # no predictor
  del c.head.pred_last_bn
  return c


def byol(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """BYOL on a MoCo v3 config, as the v3 paper compares it (Table 4): the same backbone, heads
  (projector, predictor), optimizer, schedule and augmentation; the target network is the
  momentum encoder with momentum 0.99 -> 1 (cosine); the normalised-MSE loss has no temperature."""
  c.method = 'byol'
  del c.temperature         # no logits
  c.momentum = ml_collections.ConfigDict(dict(base=0.99, cosine=True))
  return c


def fashion_mnist(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Points a config at Debian's Fashion-MNIST IDX files (28 px, 1 channel): the CPU demos."""
  c.data.source = 'idx'
  c.data.name = 'fashion_mnist'
  c.data.data_dir = '/usr/share/datasets/fashion-mnist'
  c.data.eval_split = 'test'
  c.data.image_size = 28
  c.data.mean, c.data.std = (0.2860,), (0.3530,)
  c.eval.knn_every_epochs = 1
  c.eval.batch_size = 1000
  c.log_every_steps = 20
  c.checkpoint_every_steps = 200
  return c
