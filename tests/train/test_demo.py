"""``invertible-demo``: trains, reports accuracy, compares memory with and without saving."""

from __future__ import annotations

import pytest

from invertible_train import demo


def test_demo_trains_and_prints_the_memory_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert demo.main(["--model", "tiny", "--steps", "20", "--image-size", "8", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "test accuracy" in out and "images/s" in out
    assert "memory saving" in out and "activations MiB" in out
    assert "\non " in out and "\noff " in out


def test_demo_with_revnet38_saves_activation_memory(capsys: pytest.CaptureFixture[str]) -> None:
    assert demo.main(["--steps", "3", "--image-size", "8", "--batch-size", "8", "--quiet"]) == 0
    out = capsys.readouterr().out
    ratio = float(out.split("memory saving keeps ")[1].split("x")[0])
    assert ratio > 1.0


@pytest.mark.parametrize("option", ["--steps", "--batch-size", "--image-size", "--lr"])
def test_a_non_positive_value_is_a_usage_error_not_a_traceback(
    capsys: pytest.CaptureFixture[str], option: str
) -> None:
    with pytest.raises(SystemExit) as exit_:
        demo.main([option, "0"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}: must be greater than 0, got 0" in err and "Traceback" not in err
