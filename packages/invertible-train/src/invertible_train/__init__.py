"""invertible-train: the CIFAR training harness of the invertible model zoo.

Train any ``invertible_models`` network on CIFAR-10/100, your own images or synthetic data,
reproducing the RevNet paper's recipe, with atomic checkpoints and bit-exact resumption.
Most users need only the command line (``invertible-train``, ``invertible-eval``,
``invertible-demo``, ``invertible-plot``); the names below are for scripts.
"""

from invertible_train._version import __version__
from invertible_train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from invertible_train.config import ConfigError, ExperimentConfig, load_experiment
from invertible_train.data import DatasetUnavailableError, build_data
from invertible_train.engine import NonFiniteLossError, Trainer
from invertible_train.results import ResultsDirError

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DatasetUnavailableError",
    "ExperimentConfig",
    "NonFiniteLossError",
    "ResultsDirError",
    "Trainer",
    "__version__",
    "build_data",
    "load_checkpoint",
    "load_experiment",
    "save_checkpoint",
]
