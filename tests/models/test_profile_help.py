"""``invertible-profile --help`` shows the default of every option that has one."""

from __future__ import annotations

import argparse

import pytest

from invertible_models.profiler import build_parser, main


def test_every_option_with_a_default_shows_it_in_the_help(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    # the options' section, unwrapped (argparse wraps the help text)
    shown = " ".join(capsys.readouterr().out.split("options:", 1)[1].split())
    defaults = {
        action.option_strings[0]: action.default
        for action in build_parser()._actions
        if action.option_strings and action.default not in (None, False, argparse.SUPPRESS)
    }
    assert {"--batch-size", "--image-size", "--num-classes", "--device"} <= set(defaults)
    for option, default in defaults.items():
        help_text = shown.split(option, 1)[1].split(" --", 1)[0]
        assert f"default: {default}" in help_text or f"default {default}" in help_text, option
