"""The GPU suite's tables (``benchmarks/gpu``): from the newest committed GPU run's record
(``gpu-<date>.json``), or "to be measured" in every cell until a GPU has run the suite.

The tables are laid out by the suite's own ``report.py`` (the same tables its
``gpu-<date>.md`` shows); a dry run's record (toy sizes on the CPU) is never shown.
"""

from __future__ import annotations

import importlib
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from .records import REPO_ROOT, RESULTS_DIR, RecordError, RecordSpec

GPU_SUITE = REPO_ROOT / "benchmarks" / "gpu"
#: the suite's modules report.py needs, importable by these plain names from GPU_SUITE
_SUITE_MODULES = ("record", "plan", "report")


def suite_report() -> ModuleType:
    """The suite's ``report`` module, imported without leaving its plain module names
    (``record``, ``plan``, ``report``) in ``sys.modules`` or its folder on ``sys.path``."""
    clash = {name: sys.modules[name] for name in _SUITE_MODULES if name in sys.modules}
    sys.path.insert(0, str(GPU_SUITE))
    try:
        for name in _SUITE_MODULES:
            sys.modules.pop(name, None)
        return importlib.import_module("report")
    finally:
        sys.path.remove(str(GPU_SUITE))
        for name in _SUITE_MODULES:
            sys.modules.pop(name, None)
        sys.modules.update(clash)


def newest_gpu_record(results_dir: Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest GPU run's record (not a dry run's) under ``results_dir``, if any."""
    for path in sorted(results_dir.glob("gpu-2*.json"), reverse=True):
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise RecordError(f"benchmarks/results/{path.name} is not valid JSON ({exc})") from None
        if isinstance(record, dict) and not record.get("dry_run"):
            return path, record
    return None


GPU = RecordSpec(
    "gpu-<date>.json",
    "bash benchmarks/gpu/run.sh",
    lambda record: "the GPU suite",
    optional=True,
)


@dataclass(frozen=True)
class GpuTableSpec:
    """A table of the GPU suite's report: the newest GPU record's, or placeholders."""

    name: str
    table: str  # the name in report.SITE_TABLES
    record: RecordSpec = GPU

    def render(self, results_dir: Path | None = None) -> str:
        found = newest_gpu_record(results_dir or RESULTS_DIR)
        tables: dict[str, Callable[[Any], str]] = suite_report().SITE_TABLES
        if self.table not in tables:
            raise RecordError(
                f"benchmarks/gpu/report.py has no table {self.table!r} (it has "
                f"{', '.join(tables)}); change docs/_ext/benchmark_results/gpu.py to match"
            )
        if found is None:
            return (
                f"{tables[self.table](None)}\n\nNo GPU run is recorded yet: `bash "
                "benchmarks/gpu/run.sh` on a CUDA machine writes `benchmarks/results/"
                "gpu-<date>.json`; once it is committed, its figures fill this table."
            )
        path, record = found
        try:
            table = tables[self.table](record)
        except (KeyError, IndexError, TypeError) as exc:
            raise RecordError(
                f"benchmarks/results/{path.name}: the table 'gpu:{self.table}' cannot be made "
                f"from it ({type(exc).__name__}: {exc}); rerun the GPU suite of this checkout"
            ) from None
        return f"{table}\n\nFrom `benchmarks/results/{path.name}`, written by `{GPU.command}`."


TABLES = [
    GpuTableSpec(f"gpu:{name}", name)
    for name in ("environment", "tests", "memory", "throughput", "fit-batch")
]
