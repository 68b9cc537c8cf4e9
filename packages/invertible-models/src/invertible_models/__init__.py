"""invertible-models: the zoo of reversible networks and their plain twins, and a profiler.

ResNets and RevNets (the RevNet paper), ViTs and RevViTs (the RevViT paper), each one
``create_model(name)`` away; ``memory_saving`` is one switch with one meaning on all of them,
on by default for the reversible networks and off for the plain ones (as timm's).
ResNets and RevNets (the RevNet paper), ViTs and RevViTs (the RevViT paper), the
i-RevNet, Glow, and the iUNet (fully invertible 2D/3D U-Net) with its plain twin, each one
``create_model(name)`` away; ``memory_saving`` is one switch with one meaning on all of them.

Build a model by name::

    from invertible_models import create_model, list_models

    model = create_model("revnet110", num_classes=100)  # reversible stages save memory
    plain = create_model("revnet110", num_classes=100, memory_saving=False)
    resnet = create_model("resnet110", num_classes=100)  # the conventional ResNet

Or make an existing residual network reversible, with its weights::

    from invertible_models import make_reversible

    model = make_reversible(torchvision.models.resnet50(), method="momentum")

Run ``invertible-profile revnet110 resnet110`` to see what reversibility buys.
"""

from invertible_models._version import __version__
from invertible_models.blocks import (
    BasicBlock,
    BasicResidual,
    Bottleneck,
    BottleneckResidual,
    ResidualBlock,
    reversible_block,
)
from invertible_models.conversion import CoefficientSchedule, ConvertedModel
from invertible_models.convert import ConversionError, make_reversible
from invertible_models.glow import Glow
from invertible_models.irevnet import IRevNet
from invertible_models.iunet import IUNet
from invertible_models.registry import create_model, list_models, register_model

# The model files register their constructors on import (the registry imports none of them).
from invertible_models.resnet import ResNet
from invertible_models.revnet import RevNet, RevNetStage
from invertible_models.revvit import ReversibleVisionTransformer
from invertible_models.unet import UNet
from invertible_models.vit import VisionTransformer

__all__ = [
    "BasicBlock",
    "BasicResidual",
    "Bottleneck",
    "BottleneckResidual",
    "CoefficientSchedule",
    "ConversionError",
    "ConvertedModel",
    "Glow",
    "IRevNet",
    "IUNet",
    "ResNet",
    "ResidualBlock",
    "RevNet",
    "RevNetStage",
    "ReversibleVisionTransformer",
    "UNet",
    "VisionTransformer",
    "__version__",
    "create_model",
    "list_models",
    "make_reversible",
    "register_model",
    "reversible_block",
]
