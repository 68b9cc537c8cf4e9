"""The GPU suite's driver: every stage in its own process, each time-boxed, one record out.

``benchmarks/gpu/run.sh`` runs this with our three packages' ``src/`` folders first on
``PYTHONPATH``. The stages, in order (see each ``stage_*.py`` for what it measures):

======================  =============================================================
``environment``         torch, CUDA, GPU, versions; CUDA initialised once (env_facts.py)
``tests``               the CUDA-only tests, one pytest run, counted
``memory``              MemCNN's activation-memory table, fp32 and bf16, saving on/off
``throughput``          images/s of the RevNets and the reversible transformer, bf16/fp16
``fit_batch``           the largest batch of RevNet-164 and ResNet-164 within 40 GiB
======================  =============================================================

Time: the whole suite ends within ``--deadline-s`` (475 s on the GPU: under 8 minutes, CUDA start-up included,
as each stage's process starts CUDA itself). Each stage has a nominal budget; a stage may also use
what earlier stages left unused, but never the nominal budgets of the stages after it, so
one slow stage cannot eat the others. A stage that outlives its box is sent SIGTERM, then
SIGKILL, and recorded as ``timeout`` with the rows it had finished and the tail of its
output; a stage that crashes is recorded as ``error``; the others still run.

Output: ``gpu-<date>.json`` (the record), ``gpu-<date>.md`` (its tables) and
``gpu-<date>.log`` (every stage's output) in ``--out`` (default ``benchmarks/results``);
a ``-2``, ``-3``... suffix instead of overwriting an earlier run of the same day. Dry runs
are named ``gpu-dry-run-<date>``. This file imports no torch: the driver cannot hang in CUDA.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from record import SCHEMA, STATUSES, read_json, write_json, write_text
from report import suite_markdown, summary_text

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
SOURCES = [
    ROOT / "packages" / p / "src"
    for p in ("invertible-core", "invertible-models", "invertible-train")
]

#: seconds between SIGTERM and SIGKILL, and the slack a stage's process gets past its box
GRACE_S = 5.0


@dataclass(frozen=True)
class Stage:
    name: str
    script: str
    gpu_budget_s: float
    dry_budget_s: float


STAGES = (
    # the first process on a fresh machine reads torch and the CUDA libraries from a cold disk
    Stage("environment", "env_facts.py", 40, 90),
    Stage("tests", "stage_tests.py", 80, 240),
    Stage("memory", "stage_memory.py", 110, 240),
    Stage("throughput", "stage_throughput.py", 95, 180),
    Stage("fit_batch", "stage_fit_batch.py", 100, 180),
)
STAGE_NAMES = tuple(s.name for s in STAGES)

DEADLINE_S = {"gpu": 475.0, "dry": 1050.0}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="benchmarks/gpu/run.sh",
        description="The GPU suite: CUDA tests, memory table, throughput, largest batch; one "
        "JSON record and a Markdown table.",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="every stage at toy sizes on the CPU (CUDA hidden): a rehearsal for CI",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=ROOT / "benchmarks" / "results",
        help="folder for gpu-<date>.json/.md/.log (default: benchmarks/results)",
    )
    parser.add_argument(
        "--only",
        nargs="+",
        choices=STAGE_NAMES,
        metavar="STAGE",
        help=f"run only these stages (environment always runs): {', '.join(STAGE_NAMES)}",
    )
    parser.add_argument(
        "--deadline-s",
        type=float,
        help="the whole suite's time limit in seconds (default 475 on the GPU, 1050 for a dry run)",
    )
    return parser


def git_facts() -> dict[str, Any]:
    """The commit measured: ``GIT_COMMIT`` from the environment, else git, else unknown.

    A lent GPU machine gets a copy of the working tree, possibly without ``.git``: pass
    ``GIT_COMMIT=$(git rev-parse HEAD)`` on its command line.
    """
    facts: dict[str, Any] = {"commit": os.environ.get("GIT_COMMIT") or None, "dirty": None}
    try:
        head = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "HEAD"],
            capture_output=True, text=True, timeout=20,
        )  # fmt: skip
        if head.returncode == 0:
            facts["commit"] = facts["commit"] or head.stdout.strip()
            status = subprocess.run(
                ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                capture_output=True, text=True, timeout=20,
            )  # fmt: skip
            facts["dirty"] = bool(status.stdout.strip()) if status.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):  # no git on this machine
        pass
    return facts


def output_stem(out: Path, dry_run: bool, today: dt.date) -> str:
    """``gpu-<date>`` (or ``gpu-dry-run-<date>``), suffixed so no earlier file is replaced."""
    base = f"gpu-{'dry-run-' if dry_run else ''}{today.isoformat()}"
    stem, n = base, 1
    while any((out / f"{stem}{ext}").exists() for ext in (".json", ".md", ".log")):
        n += 1
        stem = f"{base}-{n}"
    return stem


def stage_environment(dry_run: bool) -> dict[str, str]:
    env = dict(os.environ)
    paths = [*map(str, SOURCES), str(HERE)]
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [*paths, env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    if dry_run:
        env["CUDA_VISIBLE_DEVICES"] = ""  # a rehearsal on the CPU, even on a GPU machine
    return env


def _terminate(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the stage's process group, then SIGKILL after ``GRACE_S``."""
    for sig, wait in ((signal.SIGTERM, GRACE_S), (signal.SIGKILL, None)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue
    process.wait()


def run_stage(
    stage: Stage,
    allotted_s: float,
    *,
    device: str,
    dry_run: bool,
    env: dict[str, str],
    work: Path,
    log: IO[bytes],
    log_path: Path,
) -> dict[str, Any]:
    """Run one stage in its own process group, within ``allotted_s``; its record."""
    result_path = work / f"{stage.name}.json"
    command = [
        sys.executable, str(HERE / stage.script),
        "--result", str(result_path), "--budget-s", f"{allotted_s:.1f}", "--device", device,
        *(["--dry-run"] if dry_run else []),
    ]  # fmt: skip
    log.write(f"\n===== stage {stage.name} (box {allotted_s:.0f} s) =====\n".encode())
    log.flush()
    log_start = log.tell()
    started = time.monotonic()
    process = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    timed_out = False
    try:
        process.wait(timeout=allotted_s + GRACE_S)
    except subprocess.TimeoutExpired:
        timed_out = True
        _terminate(process)
    finally:  # the driver itself interrupted (SIGTERM, Ctrl-C): take the stage along
        if process.poll() is None:
            _terminate(process)
    seconds = time.monotonic() - started
    log.flush()
    with log_path.open("rb") as handle:
        handle.seek(log_start)
        tail = handle.read().decode(errors="replace")[-3000:]
    result = read_json(result_path)
    record: dict[str, Any] = {
        "name": stage.name,
        "status": "error",
        "seconds": seconds,
        "budget_s": allotted_s,
        "exit_code": process.returncode,
        "error_tail": None,
        "result": result,
    }
    if timed_out:
        record["status"] = "timeout"
    elif process.returncode != 0:
        record["status"] = "error"
    elif not isinstance(result, dict) or result.get("status") not in STATUSES:
        record["status"] = "error"
        tail += "\n(the stage exited without writing a final result)"
    else:
        record["status"] = result["status"]
    if record["status"] in ("timeout", "error", "failed"):
        record["error_tail"] = tail
    return record


def allotment(index: int, remaining_s: float, dry_run: bool) -> float:
    """Seconds for stage ``index``: at most twice its budget, and never the later stages'."""
    key = "dry_budget_s" if dry_run else "gpu_budget_s"
    own = getattr(STAGES[index], key)
    later = sum(getattr(s, key) for s in STAGES[index + 1 :])
    # a stage may end up to 2 x GRACE_S past its box (the wait, then SIGTERM's grace)
    return max(0.0, min(2 * own, remaining_s - later - 2 * GRACE_S))


def cuda_missing(environment: dict[str, Any]) -> bool:
    """Whether the environment stage showed that this machine has no usable CUDA.

    Only then is measuring pointless; a slow or otherwise failing environment stage proves
    nothing about the others, which then run and record what they meet.
    """
    facts = (environment.get("result") or {}).get("facts") or {}
    if environment["status"] == "ok":
        return not facts.get("cuda_available")
    return "CUDA is not available" in (environment.get("error_tail") or "")


def _interrupted(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def skipped(stage: Stage, why: str) -> dict[str, Any]:
    return {
        "name": stage.name,
        "status": "skipped",
        "seconds": 0.0,
        "budget_s": 0.0,
        "exit_code": None,
        "error_tail": None,
        "result": {"status": "skipped", "note": why, "rows": []},
    }


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # SIGTERM unwinds like Ctrl-C: the running stage's process group is ended, not orphaned
    signal.signal(signal.SIGTERM, _interrupted)
    dry_run: bool = args.dry_run
    device = "cpu" if dry_run else "cuda"
    deadline_s = args.deadline_s or DEADLINE_S["dry" if dry_run else "gpu"]
    started_at = dt.datetime.now(dt.timezone.utc)
    start = time.monotonic()
    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    stem = output_stem(out, dry_run, started_at.date())
    json_path, md_path, log_path = (out / f"{stem}{ext}" for ext in (".json", ".md", ".log"))
    env = stage_environment(dry_run)
    record: dict[str, Any] = {
        "suite": "invertible GPU suite",
        "schema": SCHEMA,
        "date": started_at.date().isoformat(),
        "started": started_at.isoformat(timespec="seconds"),
        "dry_run": dry_run,
        "device": device,
        "deadline_s": deadline_s,
        "git": git_facts(),
        "host": {"python": sys.version.split()[0], "platform": platform.platform()},
        "stages": [],
    }
    print(
        f"[suite] {'dry run' if dry_run else 'GPU run'}, deadline {deadline_s:.0f} s -> {json_path}",
        flush=True,
    )
    blocked: str | None = None
    with tempfile.TemporaryDirectory(prefix="gpu-suite-") as tmp, log_path.open("ab") as log:
        work = Path(tmp)
        for index, stage in enumerate(STAGES):
            remaining = deadline_s - (time.monotonic() - start)
            if args.only and stage.name != "environment" and stage.name not in args.only:
                entry = skipped(stage, "not selected (--only)")
            elif blocked:
                entry = skipped(stage, blocked)
            elif (allotted := allotment(index, remaining, dry_run)) < 1.0:
                entry = skipped(stage, "the suite's deadline had passed")
            else:
                print(f"[suite] {stage.name}: box {allotted:.0f} s ...", flush=True)
                entry = run_stage(
                    stage, allotted, device=device, dry_run=dry_run, env=env,
                    work=work, log=log, log_path=log_path,
                )  # fmt: skip
            print(f"[suite] {stage.name}: {entry['status']} ({entry['seconds']:.1f} s)", flush=True)
            record["stages"].append(entry)
            if stage.name == "environment" and not dry_run and cuda_missing(entry):
                blocked = "CUDA is not available here: nothing to measure (use --dry-run)"
            record["wall_s"] = time.monotonic() - start
            write_json(json_path, record)  # after every stage: a killed suite leaves a record
    record["finished"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    record["wall_s"] = time.monotonic() - start
    write_json(json_path, record)
    try:
        markdown, summary = suite_markdown(record), summary_text(record)
    except Exception as exc:  # a report bug must not cost the measurements: the JSON has them
        markdown = summary = f"the report failed ({type(exc).__name__}: {exc}); see {json_path}"
    write_text(md_path, markdown)
    print(summary, flush=True)
    print(f"[suite] wrote {json_path}, {md_path.name}, {log_path.name}", flush=True)
    if blocked:
        return 2
    bad = [s["name"] for s in record["stages"] if s["status"] in ("failed", "timeout", "error")]
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
