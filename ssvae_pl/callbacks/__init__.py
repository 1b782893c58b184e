"""Callbacks by concern; every name importable from here (``ssvae_pl.callbacks.EMAWeights`` in a config).

* ``timing``: ``EpochTimer``, ``LatentProbe``, ``RunProgressBar``;
* ``pictures``: ``GenerativeImages``, ``LatentSpace``, ``ConfusionMatrix``, ``HParamsWithMetrics``;
* ``checkpoints``: ``LastCheckpoint``, ``BestCheckpoint``;
* ``robustness``: ``NonFiniteGuard``, ``SaveOnInterrupt``, ``SeedEachEpoch``, ``ResumeWithNewOptimizerSettings``;
* ``averaging``: ``EMAWeights``;
* ``always_on``: ``trainer_pieces``, what every ``ssvae`` Trainer gets.
"""

from ssvae_pl.callbacks.always_on import trainer_pieces
from ssvae_pl.callbacks.averaging import EMAWeights
from ssvae_pl.callbacks.checkpoints import BestCheckpoint, LastCheckpoint, run_folder
from ssvae_pl.callbacks.pictures import (ConfusionMatrix, GenerativeImages, HParamsWithMetrics, LatentSpace,
                                         grid_figure_inches)
from ssvae_pl.callbacks.robustness import (NonFiniteGuard, ResumeWithNewOptimizerSettings, SaveOnInterrupt,
                                           SeedEachEpoch)
from ssvae_pl.callbacks.timing import EpochTimer, LatentProbe, RunProgressBar

__all__ = ["BestCheckpoint", "ConfusionMatrix", "EMAWeights", "EpochTimer", "GenerativeImages", "HParamsWithMetrics",
           "LastCheckpoint", "LatentProbe", "LatentSpace", "NonFiniteGuard", "ResumeWithNewOptimizerSettings",
           "RunProgressBar", "SaveOnInterrupt", "SeedEachEpoch", "grid_figure_inches", "run_folder",
           "trainer_pieces"]
