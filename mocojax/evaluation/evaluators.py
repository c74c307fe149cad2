"""The evaluators of pretraining (loop.Evaluator: `run(state) -> {name: value}`).

  Knn          weighted-kNN top-1 of backbone features (train split as the bank, eval split as
               queries; centre crops, inference mode): the trainer's monitor and the
               `mocojax.knn` command run this one class.
  OnlineProbe  test top-1 of the online linear probe trained alongside pretraining.

Both take a `variables_of(state)` that picks the backbone's variables out of whatever state
they are given (a TrainState, or a backbone restored from a checkpoint).
"""

import dataclasses
from typing import Any, Callable

import numpy as np
from jax.sharding import Mesh

from mocojax.data.sources import Source
from mocojax.evaluation import features as features_lib
from mocojax.evaluation import knn as knn_lib
from mocojax.evaluation import online_probe


@dataclasses.dataclass
class Knn:
  features: Callable            # (variables, images) -> [B, D]
  variables_of: Callable        # state -> the variables `features` takes
  bank: Source
  queries: Source
  data_config: Any              # image size, mean and std of the centre crops
  batch_size: int
  ks: tuple
  temperature: float
  mesh: Mesh

  def accuracies(self, state) -> dict:
    """{k: top-1 in [0, 1]}."""
    variables = self.variables_of(state)
    (bf, bl, bm), (qf, ql, qm) = (
        features_lib.split_features(self.features, variables, source, data_config=self.data_config,
                                    batch_size=self.batch_size, mesh=self.mesh)
        for source in (self.bank, self.queries))
    return knn_lib.knn_accuracy(bf, bl, qf, ql, num_classes=self.bank.num_classes,
                                ks=tuple(self.ks), temperature=self.temperature, mesh=self.mesh,
                                bank_mask=bm, query_mask=qm)

  def run(self, state) -> dict:
    return {f'knn/top1@{k}': v for k, v in self.accuracies(state).items()}


@dataclasses.dataclass
class OnlineProbe:
  """Top-1 of `state.probe` on the centre-cropped eval split (one feature pass of its own)."""
  features: Callable
  variables_of: Callable
  queries: Source
  data_config: Any
  batch_size: int
  mesh: Mesh

  def run(self, state) -> dict:
    f, labels, mask = features_lib.split_features(
        self.features, self.variables_of(state), self.queries, data_config=self.data_config,
        batch_size=self.batch_size, mesh=self.mesh)
    return {'probe/test_top1': float(np.asarray(
        online_probe.accuracy(state.probe['params'], f, labels, mask)))}
