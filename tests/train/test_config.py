"""Experiments are data: shipped recipe, inheritance, validation, overrides."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from invertible_train.config import (
    ConfigError,
    ExperimentConfig,
    TrainConfig,
    apply_overrides,
    check_run_name,
    config_from_dict,
    config_to_dict,
    dump_toml,
    list_experiments,
    load_experiment,
    resolve_intervals,
)
from invertible_train.optim import schedule_positions

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - the package's own fallback
    import tomli as tomllib

PAPER_MODELS = ("resnet32", "resnet110", "resnet164", "revnet38", "revnet110", "revnet164")


@pytest.mark.parametrize("model", PAPER_MODELS)
def test_each_paper_model_defaults_to_the_paper_recipe(model: str) -> None:
    cfg = load_experiment(model)
    assert cfg.model.name == model
    # the RevNets save memory; the ResNets leave it to the model, which trains plainly
    assert cfg.model.memory_saving is (True if model.startswith("revnet") else None)
    assert (cfg.optimizer.name, cfg.optimizer.lr, cfg.optimizer.momentum) == ("sgd", 0.1, 0.9)
    assert cfg.optimizer.weight_decay == 2e-4
    assert cfg.data.batch_size == 100
    assert cfg.train.iterations == 80000
    assert (cfg.scheduler.name, cfg.scheduler.unit, cfg.scheduler.gamma) == (
        "multistep",
        "fraction",
        0.1,
    )
    # halfway and at three quarters: the paper's 40,000 and 60,000 of 80,000 iterations
    milestones = schedule_positions(cfg.scheduler.milestones, cfg.scheduler.unit, 80000)
    assert milestones == [40000, 60000]
    assert resolve_intervals(cfg.train, 80000) == {
        "log_every": 100, "eval_every": 2000, "checkpoint_every": 1000
    }  # fmt: skip
    assert cfg.data.augment and cfg.data.crop_padding == 4 and cfg.data.horizontal_flip


def test_shipped_experiments_are_listed() -> None:
    assert {"recipe", *PAPER_MODELS} <= set(list_experiments())


def test_a_model_without_its_own_file_gets_the_recipe() -> None:
    cfg = load_experiment("tiny")
    assert cfg.model.name == "tiny" and cfg.train.iterations == 80000


def test_user_file_extends_a_shipped_experiment_and_a_relative_file(tmp_path: Path) -> None:
    (tmp_path / "base.toml").write_text(
        'extends = "revnet110"\n[optimizer]\nlr = 0.05\n[train]\nseed = 7\n'
    )
    (tmp_path / "mine.toml").write_text(
        'extends = "base.toml"\nname = "short"\n[train]\niterations = 1000\n'
    )
    cfg = load_experiment(config_file=tmp_path / "mine.toml")
    assert cfg.model.name == "revnet110"  # from the shipped grandparent
    assert cfg.optimizer.lr == 0.05 and cfg.optimizer.momentum == 0.9  # merged per key
    assert (cfg.train.seed, cfg.train.iterations) == (7, 1000)
    assert cfg.run_name() == "short"


def test_unknown_key_error_lists_the_valid_keys(tmp_path: Path) -> None:
    (tmp_path / "typo.toml").write_text('extends = "recipe"\n[scheduler]\nlr_milestones = [5]\n')
    with pytest.raises(ConfigError) as err:
        load_experiment("tiny", tmp_path / "typo.toml")
    message = str(err.value)
    assert "scheduler.lr_milestones" in message
    assert "milestones" in message and "gamma" in message and "name" in message
    assert "typo.toml" in message


def test_unknown_table_is_an_error() -> None:
    with pytest.raises(ConfigError, match="unknown key 'trian'.*train"):
        config_from_dict({"trian": {"seed": 1}})


def test_wrong_type_names_key_and_expected_type(tmp_path: Path) -> None:
    (tmp_path / "bad.toml").write_text('[optimizer]\nlr = "fast"\n')
    with pytest.raises(ConfigError, match=r"optimizer.lr expects float, got 'fast'"):
        load_experiment("tiny", tmp_path / "bad.toml")


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        ({"train": {"iterations": True}}, "train.iterations expects int"),
        ({"scheduler": {"milestones": [1, "x"]}}, r"scheduler.milestones\[1\] expects float"),
        ({"scheduler": {"milestones": 5}}, "scheduler.milestones expects list"),
        ({"model": {"options": 3}}, "model.options expects dict"),
        ({"data": 3}, r"\[data\] must be a table"),
        ({"train": {"amp": "fp8"}}, "train.amp must be one of bf16, fp16, off"),
        ({"data": {"batch_size": 0}}, "data.batch_size must be a positive number; got 0"),
        ({"data": {"workers": -1}}, "data.workers must be a number >= 0"),
        ({"train": {"iterations": 0}}, "set train.iterations or train.epochs"),
        ({"optimizer": {"lr": -0.1}}, "optimizer.lr must be a positive number; got -0.1"),
        ({"optimizer": {"lr": float("nan")}}, "optimizer.lr must be a positive number"),
        ({"optimizer": {"momentum": 1.0}}, r"optimizer.momentum must be in \[0, 1\)"),
        ({"optimizer": {"weight_decay": -1}}, "optimizer.weight_decay must be a number >= 0"),
        ({"scheduler": {"gamma": 0}}, "scheduler.gamma must be a positive number"),
        ({"scheduler": {"unit": "epoch"}}, "scheduler.unit must be one of fraction, iteration"),
        (
            {"scheduler": {"milestones": [40000]}},
            r"scheduler.milestones\[0\] is 40000.0, but with scheduler.unit = 'fraction'",
        ),
        (
            {"scheduler": {"unit": "iteration", "milestones": [0.5]}},
            "whole iteration numbers from 1",
        ),
        ({"scheduler": {"warmup": 1.5}}, "scheduler.warmup is 1.5, but with scheduler.unit"),
        ({"train": {"log_every": -1}}, "train.log_every must be a number >= 0"),
        ({"train": {"threads": -2}}, "train.threads must be a number >= 0"),
        ({"name": ".."}, "name '..' is not a folder name"),
        ({"name": "a/b"}, "name 'a/b' is not a folder name"),
    ],
)
def test_invalid_values_are_rejected(raw: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        config_from_dict(raw)


def test_ints_are_accepted_for_floats() -> None:
    cfg = config_from_dict({"optimizer": {"lr": 1}})
    assert cfg.optimizer.lr == 1.0 and isinstance(cfg.optimizer.lr, float)


def test_set_overrides_are_parsed_as_toml_and_type_checked() -> None:
    cfg = apply_overrides(
        ExperimentConfig(),
        [
            "optimizer.lr=0.05",
            "scheduler.milestones=[10, 20]",
            "scheduler.unit=iteration",
            "model.name=revnet38",
            "train.tensorboard=false",
            "model.options.width=8",
        ],
    )
    assert cfg.optimizer.lr == 0.05
    assert cfg.scheduler.milestones == [10, 20] and cfg.scheduler.unit == "iteration"
    assert cfg.model.name == "revnet38"
    assert cfg.train.tensorboard is False
    assert cfg.model.options == {"width": 8}
    with pytest.raises(ConfigError, match="optimizer.lr expects float, got 'abc'"):
        apply_overrides(cfg, ["optimizer.lr=abc"])
    with pytest.raises(ConfigError, match="unknown key 'train.sed'.*seed"):
        apply_overrides(cfg, ["train.sed=1"])
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides(cfg, ["optimizer.lr"])
    with pytest.raises(ConfigError, match="is not a table"):
        apply_overrides(cfg, ["name.sub=1"])


def test_missing_shipped_parent_names_the_shipped_ones(tmp_path: Path) -> None:
    (tmp_path / "a.toml").write_text('extends = "revnet39"\n')
    with pytest.raises(ConfigError, match="no shipped experiment named 'revnet39'.*revnet38"):
        load_experiment(config_file=tmp_path / "a.toml")


def test_inheritance_cycles_and_broken_files_are_reported(tmp_path: Path) -> None:
    (tmp_path / "a.toml").write_text('extends = "b.toml"\n')
    (tmp_path / "b.toml").write_text('extends = "a.toml"\n')
    with pytest.raises(ConfigError, match="cycle"):
        load_experiment(config_file=tmp_path / "a.toml")
    (tmp_path / "c.toml").write_text("[train\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_experiment(config_file=tmp_path / "c.toml")
    (tmp_path / "d.toml").write_text("extends = 3\n")
    with pytest.raises(ConfigError, match="must be a string"):
        load_experiment(config_file=tmp_path / "d.toml")
    with pytest.raises(ConfigError, match="does not exist"):
        load_experiment(config_file=tmp_path / "missing.toml")
    (tmp_path / "e.toml").write_text("model = 3\n")
    with pytest.raises(ConfigError, match="'model' must be a table"):
        load_experiment("tiny", tmp_path / "e.toml")


def test_resolved_config_round_trips_through_toml(tmp_path: Path) -> None:
    cfg = apply_overrides(
        load_experiment("revnet38"),
        ['name="a \\"quoted\\" name"', "model.options.width=8", "data.dataset=synthetic"],
    )
    path = tmp_path / "config.toml"
    path.write_text(dump_toml(config_to_dict(cfg)))
    again = load_experiment(config_file=path)
    assert config_to_dict(again) == config_to_dict(cfg)


def test_dump_toml_refuses_values_toml_cannot_hold() -> None:
    with pytest.raises(ConfigError, match="cannot write"):
        dump_toml({"x": {1, 2}})


def test_an_unset_option_is_left_out_of_the_toml_and_reads_back_unset() -> None:
    cfg = config_from_dict({"model": {"name": "resnet32"}})
    assert cfg.model.memory_saving is None
    text = dump_toml(config_to_dict(cfg))
    assert "memory_saving" not in text
    assert config_from_dict(tomllib.loads(text)).model.memory_saving is None
    assert (
        config_from_dict({"model": {"name": "x", "memory_saving": False}}).model.memory_saving
        is False
    )


def test_run_name_defaults_to_model_and_dataset() -> None:
    cfg = config_from_dict(
        {"model": {"name": "revnet38"}, "data": {"dataset": "imagefolder:/x/pets"}}
    )
    assert cfg.run_name() == "revnet38-imagefolder-pets"
    assert config_from_dict({"model": {"name": "m"}}).run_name() == "m-cifar10"


@pytest.mark.parametrize("name", [".", "..", "", "a/b", "../x", "a\\b", "/abs", "nul\0"])
def test_a_run_name_is_one_folder_name(name: str) -> None:
    with pytest.raises(ConfigError, match="is not a folder name"):
        check_run_name(name)


def test_ordinary_run_names_pass() -> None:
    for name in ("revnet38-cifar10", "run.2", "a_b", "..x", "x.."):
        assert check_run_name(name) == name


@pytest.mark.parametrize(
    ("total", "expected"),
    [
        (80000, (100, 2000, 1000)),
        (84, (1, 4, 4)),  # digits, 6 epochs of batch 100
        (400, (4, 20, 20)),
        (5, (1, 1, 1)),
    ],
)
def test_intervals_fit_the_length_of_the_run(total: int, expected: tuple[int, ...]) -> None:
    got = resolve_intervals(TrainConfig(), total)
    assert (got["log_every"], got["eval_every"], got["checkpoint_every"]) == expected


def test_intervals_that_are_set_are_kept() -> None:
    got = resolve_intervals(TrainConfig(log_every=7, eval_every=0, checkpoint_every=9), 84)
    assert got == {"log_every": 7, "eval_every": 4, "checkpoint_every": 9}


def test_iteration_milestones_stay_possible() -> None:
    cfg = apply_overrides(
        ExperimentConfig(),
        ["scheduler.unit=iteration", "scheduler.milestones=[40000, 60000]", "scheduler.warmup=5"],
    )
    assert schedule_positions(cfg.scheduler.milestones, cfg.scheduler.unit, 100) == [40000, 60000]
