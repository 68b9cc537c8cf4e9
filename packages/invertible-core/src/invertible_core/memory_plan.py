"""Where the plan data lived before the planner became a package: names kept for importers.

The plan is :mod:`invertible_core.planner.plan` and the switches
:mod:`invertible_core.planner.switches`; import them from ``invertible_core``.
"""

from invertible_core.planner.plan import (
    MemoryBudgetError,
    MemoryPlan,
    PlanMismatchError,
    UnitCost,
    format_bytes,
    parse_bytes,
)
from invertible_core.planner.switches import Checkpointable, is_checkpointable

__all__ = [
    "Checkpointable",
    "MemoryBudgetError",
    "MemoryPlan",
    "PlanMismatchError",
    "UnitCost",
    "format_bytes",
    "is_checkpointable",
    "parse_bytes",
]
