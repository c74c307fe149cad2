"""Handing a pretrained backbone on: out of a pretraining run, and to files others can load.

  pretraining_run  the latest (or a given) checkpoint of a run's base backbone, with its config
  encoder          export to / load from an encoder directory (orbax + model.json), strict
  torch_layout     the same weights under PyTorch names and layouts (timm ViT), as safetensors
"""


def quiet_orbax_logging() -> None:
  """Keeps orbax's warnings in absl logs and drops its INFO narration of every read and write.

  For the hand-off commands (python -m mocojax.linear | export | finetune).
  """
  import logging as pylogging  # record levels are Python's (absl's WARNING is -1)

  from absl import logging
  logging.get_absl_logger().addFilter(
      lambda record: record.levelno >= pylogging.WARNING or 'orbax' not in record.pathname)
