"""The parts of :func:`~invertible_models.make_reversible`, one concept per module.

- :mod:`.units`: residual units, a residual step with its skip told apart from its branch;
- :mod:`.method`, :mod:`.momentum`, :mod:`.two_stream`: how units become couplings;
- :mod:`.run`, :mod:`.stage`: a run of units as one ``ReversibleSequence``, and a converted
  stack (runs and the blocks kept as they were);
- :mod:`.context`: one conversion in progress and its record;
- :mod:`.converted`: the network returned (the switch, the original's state_dict names);
- :mod:`.schedule`: moving the coefficients during fine-tuning;
- :mod:`.torchvision_resnet`, :mod:`.torch_encoder`, :mod:`.timm_vit`, :mod:`.sequential`:
  the architectures.
"""

from invertible_models.conversion.context import ConversionError, ConversionRecord
from invertible_models.conversion.converted import ConvertedModel
from invertible_models.conversion.method import Coefficients, ConversionMethod
from invertible_models.conversion.momentum import MomentumCoefficients
from invertible_models.conversion.run import ReversibleRun
from invertible_models.conversion.schedule import CoefficientSchedule
from invertible_models.conversion.stage import KeptBlock, ReversibleStage
from invertible_models.conversion.torch_encoder import ReversibleEncoder
from invertible_models.conversion.two_stream import TwoStreamCoefficients
from invertible_models.conversion.units import Branch, ResidualUnit, WholeBlock

__all__ = [
    "Branch",
    "CoefficientSchedule",
    "Coefficients",
    "ConversionError",
    "ConversionMethod",
    "ConversionRecord",
    "ConvertedModel",
    "KeptBlock",
    "MomentumCoefficients",
    "ResidualUnit",
    "ReversibleEncoder",
    "ReversibleRun",
    "ReversibleStage",
    "TwoStreamCoefficients",
    "WholeBlock",
]
