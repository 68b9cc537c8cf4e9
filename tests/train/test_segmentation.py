"""Segmentation in the harness: the shapes data, a folder of masks, Dice and per-class
accuracy, and a short run of the iUNet through the CLI."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from invertible_train.config import ConfigError, DataConfig
from invertible_train.data import BatchTransform, DatasetUnavailableError, build_data
from invertible_train.segmentation import Segmentation
from invertible_train.segmentation_data import shapes
from invertible_train.tasks import task_for

Run = Callable[..., int]


def _transform() -> BatchTransform:
    return BatchTransform((0.5,), (0.25,), torch.device("cpu"), augment=False)


@pytest.mark.parametrize("dims", [2, 3])
def test_shapes_are_seeded_and_their_classes_differ_by_shape_not_brightness(dims: int) -> None:
    images, masks = shapes(64, 16, dims, seed=3)
    again, same = shapes(64, 16, dims, seed=3)
    assert torch.equal(images, again) and torch.equal(masks, same)
    assert not torch.equal(shapes(64, 16, dims, seed=4)[1], masks)
    assert images.shape == (64, 1, *([16] * dims)) and masks.shape == (64, *([16] * dims))
    assert images.dtype == torch.uint8 and set(masks.unique().tolist()) == {0, 1, 2}
    values = images[:, 0].float()
    ball, box, background = (values[masks == k].mean() for k in (1, 2, 0))
    assert abs(ball - box) < 6 < box - background  # the same brightness, over the background


def test_dice_and_per_class_accuracy_are_counted_over_every_batch() -> None:
    task = Segmentation(_transform(), num_classes=3)
    labels = torch.tensor([[0, 1, 1, 2], [0, 0, 2, 2]])
    guess = torch.tensor([[0, 1, 2, 2], [0, 1, 2, 2]])
    logits = nn.functional.one_hot(guess, 3).permute(0, 2, 1).float()
    whole = task.sums(logits, labels, task.loss(logits, labels))
    parts = sum(
        task.sums(
            logits[i : i + 1], labels[i : i + 1], task.loss(logits[i : i + 1], labels[i : i + 1])
        )
        for i in range(2)
    )
    assert whole.shape == (task.sums_size,) and torch.allclose(whole[1:], parts[1:])  # type: ignore[index]
    figures = task.figures(whole, prefix="test_")
    # class 1: 1 right of 2 labelled, 2 predicted; class 2: 3 right of 3 labelled, 4 predicted
    assert figures["test_dice"] == pytest.approx((2 * 1 / 4 + 2 * 3 / 7) / 2)
    assert figures["test_accuracy_1"] == pytest.approx(0.5)
    assert figures["test_accuracy_2"] == pytest.approx(1.0)
    assert figures["test_accuracy_0"] == pytest.approx(2 / 3)
    assert figures["test_accuracy"] == pytest.approx(6 / 8)
    perfect = nn.functional.one_hot(labels, 3).permute(0, 2, 1).float() * 10
    assert task.figures(task.sums(perfect, labels, task.loss(perfect, labels)))["dice"] == 1.0


def test_the_shapes_datasets_build_through_the_data_registry() -> None:
    cfg = DataConfig(
        dataset="shapes3d", image_size=8, synthetic_train_size=6, synthetic_test_size=2
    )
    data = build_data(cfg)
    assert data.num_classes == 3 and data.channels == 1
    image, mask = data.train[0]
    assert image.shape == (1, 8, 8, 8) and mask.shape == (8, 8, 8) and mask.dtype == torch.int64
    with pytest.raises(ConfigError, match="shapes2d, shapes3d, masks:PATH"):
        build_data(DataConfig(dataset="shapes4d"))


def _write_pairs(folder: Path, names: list[str], size: int) -> None:
    from PIL import Image

    for sub in ("images", "masks"):
        (folder / sub).mkdir(parents=True)
    for i, name in enumerate(names):
        mask = torch.zeros(size, size, dtype=torch.uint8)
        mask[2:6, 2:6] = 1 + i % 2
        image = (mask * 100 + 20).unsqueeze(-1).repeat(1, 1, 3)
        Image.fromarray(image.numpy(), "RGB").save(folder / "images" / name)
        Image.fromarray(mask.numpy(), "L").save(folder / "masks" / name)


def test_a_folder_of_masks_is_a_users_own_data(tmp_path: Path) -> None:
    _write_pairs(tmp_path / "train", ["a.png", "b.png", "c.png"], 8)
    _write_pairs(tmp_path / "test", ["d.png"], 8)
    data = build_data(DataConfig(dataset=f"masks:{tmp_path}", image_size=16))
    assert data.num_classes == 3 and data.channels == 3 and len(data.train) == 3
    image, mask = data.train[1]
    assert image.shape == (3, 16, 16) and mask.shape == (16, 16)
    assert set(mask.unique().tolist()) == {0, 2}  # nearest: classes stay classes
    (tmp_path / "test" / "masks" / "d.png").unlink()
    with pytest.raises(DatasetUnavailableError, match="d.png has no mask"):
        build_data(DataConfig(dataset=f"masks:{tmp_path}", image_size=16))
    with pytest.raises(DatasetUnavailableError, match="needs subfolders images/ and masks/"):
        build_data(DataConfig(dataset=f"masks:{tmp_path / 'nowhere'}"))


def test_a_folder_of_volumes_as_numpy_files(tmp_path: Path) -> None:
    np = pytest.importorskip("numpy")
    for split, count in (("train", 2), ("test", 1)):
        for sub in ("images", "masks"):
            (tmp_path / split / sub).mkdir(parents=True)
        for i in range(count):
            volume = np.full((4, 6, 8), 50, dtype=np.uint8)
            mask = np.zeros((4, 6, 8), dtype=np.int64)
            mask[1:3, 2:4, 2:6] = 1
            np.save(tmp_path / split / "images" / f"v{i}.npy", volume)
            np.save(tmp_path / split / "masks" / f"v{i}.npy", mask)
    data = build_data(DataConfig(dataset=f"masks:{tmp_path}"))
    image, mask = data.test[0]
    assert image.shape == (1, 4, 6, 8) and mask.shape == (4, 6, 8) and data.num_classes == 2


def test_a_segmentation_model_gets_the_segmentation_task_and_its_dimension_checked() -> None:
    from invertible_models import create_model

    model = create_model("iunet", num_classes=3, depth=1, width=8, levels=1)
    task = task_for(model, _transform(), (1, 16, 16))
    assert isinstance(task, Segmentation) and task.num_classes == 3
    x = task.train_view(torch.full((2, 1, 4, 4, 4), 128, dtype=torch.uint8), 0, 0)
    assert x.shape == (2, 1, 4, 4, 4) and torch.allclose(
        x, torch.full_like(x, (128 / 255 - 0.5) / 0.25), atol=1e-6
    )
    with pytest.raises(ConfigError, match="built for 2D inputs, but the dataset's are 3D"):
        task_for(model, _transform(), (1, 8, 8, 8))


def test_the_iunet_trains_on_shapes_through_the_cli(run_cli: Run, tmp_path: Path) -> None:
    # the shipped experiment iunet-shapes2d, made small
    code = run_cli(
        "iunet",
        "shapes2d",
        "--set", "data.image_size=16",
        "--set", "data.synthetic_train_size=32",
        "--set", "data.synthetic_test_size=8",
        "--set", "model.options.width=8",
        "--set", "model.options.levels=2",
        "--set", "model.options.depth=1",
        "--set", "train.iterations=4",
        "--set", "train.epochs=0",
        "--batch-size", "8",
    )  # fmt: skip
    assert code == 0
    summary = json.loads((tmp_path / "results" / "iunet-shapes2d" / "summary.json").read_text())
    assert summary["task"] == "segmentation" and 0 <= summary["test_dice"] <= 1
    assert summary["model"] == "iunet" and summary["dataset"] == "shapes2d"
    assert {"test_accuracy_0", "test_accuracy_1", "test_accuracy_2"} <= set(summary)
