"""What the GPU suite measures: the rows of every stage, and MemCNN's figures to compare with.

Torch-free, so that the report can lay out its tables (and the site's placeholders) from
the same lists the stages measure.
"""

from __future__ import annotations

#: stage "memory": MemCNN's table, models by family, then depth
MEMORY_MODELS = ("resnet32", "resnet110", "resnet164", "revnet38", "revnet110", "revnet164")
MEMORY_PRECISIONS = ("fp32", "bf16")

#: stage "throughput": the RevNets and the zoo's reversible transformer
THROUGHPUT_CNNS = ("revnet38", "revnet110", "revnet164")
TRANSFORMER = "revvit_tiny"
THROUGHPUT_MODELS = (*THROUGHPUT_CNNS, TRANSFORMER)
AMPS = ("bf16", "fp16")

#: stage "fit_batch": the cheap search first, its figure is nearly free
FIT_BATCH_MODELS = ("resnet164", "revnet164")

#: MemCNN's published activation memory of training on a GPU (MB, batch 128, CIFAR-10),
#: from MemCNN's README: its ResNets without saving, its RevNets with saving.
MEMCNN_ACTIVATION_MB = {
    "resnet32": 238.6,
    "resnet110": 810.7,
    "resnet164": 2452.8,
    "revnet38": 85.6,
    "revnet110": 85.7,
    "revnet164": 432.7,
}
