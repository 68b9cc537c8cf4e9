"""``invertible-plot``: a PNG of the training curves, and clear errors."""

from __future__ import annotations

import builtins
from pathlib import Path

import pytest

from invertible_train import plot


@pytest.fixture
def results(run_cli, tmp_path: Path) -> Path:
    assert run_cli("tiny", "synthetic", "--iterations", "20", "--set", "train.log_every=5",
                   "--set", "train.eval_every=10") == 0  # fmt: skip
    return tmp_path / "results" / "tiny-synthetic"


def test_plot_writes_a_png_of_the_curves(results: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert plot.main([str(results)]) == 0
    png = results / "curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert str(png) in capsys.readouterr().out
    other = results / "other.png"
    assert plot.plot_curves(results, other) == other and other.exists()


def test_plot_without_matplotlib_says_how_to_install_it(
    results: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    real_import = builtins.__import__

    def no_matplotlib(name: str, *args: object, **kwargs: object) -> object:
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    assert plot.main([str(results)]) == 1
    assert "pip install 'invertible-train[plot]'" in capsys.readouterr().err


def test_plot_of_a_folder_without_metrics_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(plot.PlotUnavailableError, match="metrics.jsonl does not exist"):
        plot.plot_curves(tmp_path)
    (tmp_path / "metrics.jsonl").write_text('{"kind": "resumed", "iteration": 0}\n')
    with pytest.raises(plot.PlotUnavailableError, match="no logged steps"):
        plot.plot_curves(tmp_path)
