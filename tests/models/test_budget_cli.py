"""``invertible-profile --budget`` and ``--fit-batch``, the batch search, density models."""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from torch import nn

from invertible_models import RevNet, register_model, registry
from invertible_models.memory_budget import (
    largest_fitting_batch,
    minimum_step_peak,
    plan_training_step,
)
from invertible_models.profiler import main
from invertible_models.step import build_model, training_step

GPU = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu"
MiB = 2**20


def tinyrev8(num_classes: int = 10, memory_saving: bool = True, **options: Any) -> nn.Module:
    return RevNet(
        "basic", (2, 2, 2), (8, 8, 8, 8), num_classes, memory_saving=memory_saving, **options
    )


@pytest.fixture(scope="module")
def tinyrev() -> Iterator[str]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(registry, "_MODELS", dict(registry._MODELS))
        register_model(tinyrev8)
        yield "tinyrev8"


ARGS = ["--image-size", "8", "--steps", "1"]


def test_budget_prints_the_plan_with_its_measured_peak_and_time(
    tinyrev: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "plan.json"
    assert main([tinyrev, "--budget", "4MiB", "--batch-size", "4", *ARGS, "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "memory plan: budget 4.00 MiB on cpu" in printed
    assert "stem" in printed and "stages.1.transition" in printed and "measured" in printed
    data = json.loads(out.read_text())
    (entry,) = data["results"]
    assert entry["model"] == tinyrev and entry["batch"] == 4 and "fit_batch" not in entry
    plan = entry["plan"]
    assert plan["format"] == "invertible-memory-plan"
    assert plan["measured_peak_bytes"] <= 4 * MiB == plan["budget_bytes"] == data["budget_bytes"]
    assert plan["extra"]["input_shape"] == [4, 3, 8, 8]
    assert set(plan["keep"]) == {"stages.0.blocks", "stages.1.blocks", "stages.2.blocks"}


@pytest.fixture(scope="module")
def fitted(tinyrev: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str]:
    """One ``--fit-batch`` run (its JSON and its printout), read by the tests below."""
    import contextlib
    import io

    out = tmp_path_factory.mktemp("fit") / "fit.json"
    argv = [tinyrev, "--budget", "3MiB", "--fit-batch", "--batch-size", "2", *ARGS]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main([*argv, "--json", str(out)]) == 0
    return json.loads(out.read_text()), printed.getvalue()


def test_fit_batch_finds_the_largest_batch_whose_leanest_step_fits(
    tinyrev: str, fitted: tuple[dict[str, Any], str]
) -> None:
    data, printed = fitted
    assert "largest batch whose leanest step fits" in printed
    (entry,) = data["results"]
    fit = entry["fit_batch"]
    assert isinstance(fit, int) and fit >= 2 and entry["fit_batch_exact"]
    fits = {t["batch"]: t["fits"] for t in entry["tries"]}
    assert fits[fit] and not fits[fit + 1]
    assert entry["plan"]["measured_peak_bytes"] <= 3 * MiB
    assert entry["plan"]["extra"]["input_shape"][0] == fit
    # the leanest step of that batch does fit, one image more does not
    model = build_model(tinyrev, image_size=8)
    assert minimum_step_peak(training_step(model, batch_size=fit, image_size=8)) <= 3 * MiB
    assert minimum_step_peak(training_step(model, batch_size=fit + 1, image_size=8)) > 3 * MiB


def test_the_gpu_suite_reads_the_fitted_batch_from_the_json(
    fitted: tuple[dict[str, Any], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    data, _ = fitted
    monkeypatch.syspath_prepend(str(GPU))
    try:
        import stage_fit_batch

        found = stage_fit_batch.fitted_batch(data)
    finally:
        for name in ("stage_fit_batch", "common", "plan", "record"):
            sys.modules.pop(name, None)
    assert found == data["results"][0]["fit_batch"]


def test_fit_batch_needs_a_budget(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["revnet38", "--fit-batch"])
    assert exit_.value.code == 2 and "--fit-batch needs --budget" in capsys.readouterr().err


@pytest.mark.parametrize(("value", "match"), [("6G", "ambiguous"), ("lots", "is not a size")])
def test_a_bad_budget_is_a_usage_error(
    value: str, match: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["revnet38", "--budget", value])
    assert exit_.value.code == 2 and match in capsys.readouterr().err


def test_a_budget_below_the_minimum_says_the_minimum(
    tinyrev: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([tinyrev, "--budget", "100KiB", "--batch-size", "2", *ARGS]) == 1
    err = capsys.readouterr().err
    assert re.search(r"below the minimum of this step, [0-9.]+ KiB \([0-9,]+ bytes", err)


def test_fit_batch_that_fits_nothing_is_an_error(
    tinyrev: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [tinyrev, "--budget", "100KiB", "--fit-batch", "--batch-size", "2", *ARGS]
    assert main(argv) == 1
    assert "no batch size fits" in capsys.readouterr().err


# -- the search ------------------------------------------------------------------------------
def _linear(per_image: int, fixed: int, limit: int | None = None) -> Any:
    calls: list[int] = []

    def peak(batch: int) -> int | None:
        calls.append(batch)
        if limit is not None and batch > limit:
            return None  # out of memory
        return fixed + per_image * batch

    peak.calls = calls  # type: ignore[attr-defined]
    return peak


def test_the_search_brackets_the_exact_boundary_in_few_tries() -> None:
    peak = _linear(per_image=1000, fixed=50_000)
    found = largest_fitting_batch(peak, budget=50_000 + 1000 * 137 + 500, start=32)
    assert found.fit_batch == 137 and found.exact
    assert len(found.tries) <= 5, found.tries


def test_the_search_goes_down_and_counts_out_of_memory_as_not_fitting() -> None:
    down = largest_fitting_batch(_linear(1000, 0), budget=5_500, start=32)
    assert down.fit_batch == 5 and down.exact
    oom = largest_fitting_batch(_linear(1, 0, limit=40), budget=10**9, start=32, max_tries=12)
    assert oom.fit_batch == 40 and oom.exact
    assert any(t["peak_bytes"] is None and not t["fits"] for t in oom.tries)


def test_the_search_honours_its_cap_and_reports_what_it_saw_fit() -> None:
    capped = largest_fitting_batch(_linear(1, 0), budget=10**6, start=1, max_tries=3)
    assert len(capped.tries) == 3 and capped.fit_batch == 4 and not capped.exact
    nothing = largest_fitting_batch(_linear(10, 100), budget=50, start=4)
    assert nothing.fit_batch is None and not nothing.exact
    with pytest.raises(ValueError, match="must be >= 1"):
        largest_fitting_batch(_linear(1, 0), budget=10, start=0)


# -- density models --------------------------------------------------------------------------
def test_the_profiler_plans_a_density_model() -> None:
    model = build_model("glow", image_size=8, levels=2, steps=2, hidden_channels=8)
    step = training_step(model, batch_size=4, image_size=8)
    (images,) = step.inputs
    assert images.min() >= 0 and images.max() <= 1  # images in [0, 1]
    plan = plan_training_step(step, "512MiB", repeats=1)
    assert set(plan.keep) == {"levels.0.flow", "levels.1.flow"}
    assert plan.measured_peak_bytes is not None and plan.measured_peak_bytes <= 512 * MiB
