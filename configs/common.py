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
  c.mesh = (('data', -1),)

  c.model = ml_collections.ConfigDict(dict(
      name='vit', variant=variant, patch_size=patch_size, posemb='sincos2d', pool='cls',
      gap_norm=True, stop_grad_patch_embed=True, remat=False,
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
      # Overrides of the recipe's augmentation fields (mocojax.data.augment.ViewSpec), e.g.
      # blur_sigma; they apply to both views.
      augment=ml_collections.ConfigDict()))

  c.eval = ml_collections.ConfigDict(dict(
      knn_every_epochs=10, knn_at_end=True, knn_ks=(20, 200), knn_temperature=0.07,
      batch_size=1024))

  c.log_every_steps = 100
  c.checkpoint_every_steps = 1000
  c.keep_checkpoints = 3
  c.async_checkpointing = True
  c.plot = True
  return c
