"""Stage 1 of the GPU suite: the CUDA-only tests (``pytest -m cuda``), counted.

The test files that mark tests ``cuda`` are found by their text, so a test module that
cannot be imported on the GPU machine (it lacks hypothesis, say) is never collected. One
pytest run per test folder (``tests/core``, ``tests/models``, ``tests/train``), as tox runs
them: the folders' ``conftest.py`` helpers are imported by the plain name ``conftest`` and
cannot share one process. Within a run the tests that start a process group (marked
``distributed``) go last, so a hung NCCL initialisation costs only what follows it. Each run
has its share of the time box and is killed at its end; the ``pytest_outcomes`` plugin has by
then written every finished test's outcome, and the test still ``running`` is the one that
hung. Settings come from ``benchmarks/gpu/pytest.ini`` (no pytest plugin needed).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import StageResult, start_stage
from record import read_json

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
MARKER = "mark.cuda"

#: seconds kept back for each later run, whatever an earlier one takes
MIN_RUN_S = {"gpu": 20.0, "dry": 30.0}


def cuda_test_files(root: Path = ROOT) -> list[str]:
    """Test files (relative to ``root``) that mark at least one test ``cuda``."""
    files = sorted((root / "tests").rglob("test_*.py"))
    return [str(f.relative_to(root)) for f in files if MARKER in f.read_text(encoding="utf-8")]


def by_folder(files: list[str]) -> dict[str, list[str]]:
    """The files grouped by test folder (``tests/core``...), in order."""
    groups: dict[str, list[str]] = {}
    for f in files:
        groups.setdefault(str(Path(f).parent), []).append(f)
    return groups


def pytest_command(expression: str, files: list[str]) -> list[str]:
    return [
        sys.executable, "-m", "pytest",
        "-c", str(HERE / "pytest.ini"), "--rootdir", str(ROOT),
        "-p", "pytest_outcomes", "-p", "no:cacheprovider",
        "-q", "-rfEs", "--continue-on-collection-errors",
        "-m", expression, *files,
    ]  # fmt: skip


def run_pytest(command: list[str], outcomes: Path, timeout_s: float) -> dict[str, Any]:
    """Run pytest in its own process group; kill the group at ``timeout_s``."""
    env = dict(os.environ, GPU_SUITE_OUTCOMES=str(outcomes))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), env.get("PYTHONPATH")]))
    started = time.monotonic()
    process = subprocess.Popen(
        command,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    # pytest has a process group of its own, so that killing it takes its children along;
    # if the driver ends this stage first (SIGTERM), the group goes too
    previous = signal.signal(signal.SIGTERM, lambda *_: _kill_and_exit(process))
    timed_out = False
    try:
        output, _ = process.communicate(timeout=max(1.0, timeout_s))
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(output, flush=True)
    return {
        "exit_code": process.returncode,
        "timed_out": timed_out,
        "seconds": time.monotonic() - started,
        "output_tail": output[-3000:],
    }


def _kill_and_exit(process: subprocess.Popen[str]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    raise SystemExit(143)


def summarise(outcomes: dict[str, Any]) -> dict[str, Any]:
    """Counts by outcome, and the tests that did not pass or skip, with their messages."""
    tests: dict[str, dict[str, Any]] = outcomes.get("tests", {})
    counts = {k: 0 for k in ("passed", "failed", "error", "skipped", "xfailed", "xpassed")}
    counts["unfinished"] = 0
    problems = []
    skips: dict[str, int] = {}
    for nodeid, entry in tests.items():
        outcome = entry["outcome"]
        key = "unfinished" if outcome == "running" else outcome
        counts[key] = counts.get(key, 0) + 1
        if key in ("failed", "error", "unfinished", "xpassed"):
            problems.append({"nodeid": nodeid, "outcome": key, "message": entry.get("message")})
        if key == "skipped":
            reason = str(entry.get("message"))
            skips[reason] = skips.get(reason, 0) + 1
    collection = outcomes.get("collection_errors", [])
    return {
        **counts,
        "collection_errors": len(collection),
        "problems": problems + [{**c, "outcome": "collection error"} for c in collection],
        "skip_reasons": skips,
        "durations": {n: e.get("seconds", 0.0) for n, e in tests.items()},
    }


def main(argv: list[str] | None = None) -> int:
    args, box, _, kind = start_stage(__doc__, argv)
    files = cuda_test_files()
    outcomes_path = args.result.with_name(args.result.stem + "-outcomes.json")
    outcomes_path.unlink(missing_ok=True)
    result = StageResult(args.result, files=files, runs=[])
    groups = by_folder(files)
    keep = MIN_RUN_S[kind]
    for index, (folder, group) in enumerate(groups.items()):
        later = len(groups) - index - 1
        # what is left but the later runs' reserve; when that is too little, still a short
        # run, never past the stage's own box
        timeout = max(min(keep / 2, box.remaining()), box.remaining() - keep * later)
        record = run_pytest(pytest_command("cuda", group), outcomes_path, timeout)
        result.data["runs"].append({"folder": folder, **record})
        result.data.update(summarise(read_json(outcomes_path) or {}))
        result.save()
    data = result.data
    # pytest exits 0 (all passed), 1 (some failed) or 5 (nothing selected); anything else
    # (2 interrupted, 3 internal error, 4 usage error, or killed) means the run broke
    broken = any(r["timed_out"] or r["exit_code"] not in (0, 1, 5) for r in data["runs"])
    if any(r["timed_out"] for r in data["runs"]):
        status = "timeout"
    elif broken:
        status = "error"
    elif data["problems"]:
        status = "failed"
    else:
        status = "ok"
    if args.device == "cuda" and data.get("skipped"):
        data["note"] = f"{data['skipped']} CUDA tests skipped on the GPU: see skip_reasons"
    result.finish(status)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
