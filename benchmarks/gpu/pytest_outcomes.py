"""pytest plugin of the GPU suite: every test's outcome, written to a JSON file as it happens.

Loaded with ``-p pytest_outcomes`` by ``stage_tests.py``; the file is named by the
``GPU_SUITE_OUTCOMES`` environment variable and may already hold the outcomes of an earlier
run (they are kept). A test that has started but not finished stays ``running``: when the
stage's time box kills pytest, that is the test that hung. Tests marked ``distributed``
are moved to the end of the run, so that a hung process group holds up nothing else.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from record import read_json, write_json

ENV = "GPU_SUITE_OUTCOMES"
MESSAGE_CHARS = 1500


def _message(report: Any) -> str:
    if report.skipped and isinstance(report.longrepr, tuple):
        return str(report.longrepr[2])  # (file, line, reason)
    return str(report.longrepr)[-MESSAGE_CHARS:]


class Outcomes:
    """Collects outcomes by node id and rewrites the file after each report."""

    def __init__(self, path: Path) -> None:
        self.path = path
        data = read_json(path)
        self.data: dict[str, Any] = (
            data if isinstance(data, dict) else {"tests": {}, "collection_errors": []}
        )

    def save(self) -> None:
        write_json(self.path, self.data)

    def pytest_runtest_logstart(self, nodeid: str, location: Any) -> None:
        self.data["tests"][nodeid] = {"outcome": "running", "seconds": 0.0}
        self.save()

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        entry = self.data["tests"].setdefault(report.nodeid, {"outcome": "running", "seconds": 0.0})
        entry["seconds"] += report.duration
        if report.when == "setup":
            if report.failed:
                entry.update(outcome="error", message=_message(report))
            elif report.skipped:
                entry.update(outcome="skipped", message=_message(report))
        elif report.when == "call":
            if hasattr(report, "wasxfail"):
                entry["outcome"] = "xfailed" if report.skipped else "xpassed"
            elif report.failed:
                entry.update(outcome="failed", message=_message(report))
            elif report.skipped:
                entry.update(outcome="skipped", message=_message(report))
            else:
                entry["outcome"] = "passed"
        elif report.failed:  # teardown
            entry.update(outcome="error", message=_message(report))
        self.save()

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        if report.failed:
            self.data["collection_errors"].append(
                {"nodeid": report.nodeid, "message": _message(report)}
            )
            self.save()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests that start a process group run last (a stable sort: otherwise in order)."""
    items.sort(key=lambda item: item.get_closest_marker("distributed") is not None)


def pytest_configure(config: pytest.Config) -> None:
    path = os.environ.get(ENV)
    if path:
        config.pluginmanager.register(Outcomes(Path(path)), "gpu-suite-outcomes")
