"""invertible-train: the training harness of the invertible model zoo.

Train any ``invertible_models`` network on CIFAR-10/100, handwritten digits, your own images
or synthetic data (segmentation networks on synthetic 2D/3D shapes or your own masks), reproducing the RevNet paper's recipe, with atomic rotating checkpoints,
bit-exact resumption (after a kill, a Ctrl-C or a SIGTERM) and density models trained by
likelihood. Most users need only the command line (``invertible-train``,
``invertible-eval``, ``invertible-demo``, ``invertible-plot``); the names below are for
scripts.

The house: ``cli`` reads an experiment (``config``, the schema) and runs a ``trainer``. A
run is built (``run``: ``data``, ``model``, ``optim``, a ``tasks`` task, a ``strategy``: one
process, or a ``distributed`` torchrun rank, with ``sync_batchnorm``, or ``sharding``
under ``--fsdp``), checked before
anything is written (``preflight``: ``results``, ``resume``, ``budget``), then trained
(``trainer``: the loop, shown by ``progress``); around the loop: ``evaluation``,
``checkpoint`` (``sharded_checkpoint`` under ``--fsdp``), ``interrupts``, ``results``.
"""

from invertible_train._version import __version__
from invertible_train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from invertible_train.config import ConfigError, ExperimentConfig, load_experiment
from invertible_train.data import DatasetUnavailableError, build_data
from invertible_train.interrupts import Interrupted
from invertible_train.results import ResultsDirError
from invertible_train.segmentation import Segmentation
from invertible_train.segmentation_data import build_segmentation_data
from invertible_train.strategy import SingleProcess
from invertible_train.tasks import Classification, DensityEstimation, Task
from invertible_train.trainer import NonFiniteLossError, Trainer

__all__ = [
    "CheckpointError",
    "Classification",
    "ConfigError",
    "DatasetUnavailableError",
    "DensityEstimation",
    "ExperimentConfig",
    "Interrupted",
    "NonFiniteLossError",
    "ResultsDirError",
    "Segmentation",
    "SingleProcess",
    "Task",
    "Trainer",
    "__version__",
    "build_data",
    "build_segmentation_data",
    "load_checkpoint",
    "load_experiment",
    "save_checkpoint",
]
