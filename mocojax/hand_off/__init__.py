"""Handing a pretrained backbone on: out of a pretraining run, and to files others can load.

  pretraining_run  the latest (or a given) checkpoint of a run's base backbone, with its config
  encoder          export to / load from an encoder directory (orbax + model.json), strict
  torch_layout     the same weights under PyTorch names and layouts (timm ViT), as safetensors
"""
