"""Small datasets the tests write themselves: CIFAR-format folders and ImageFolder trees."""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from torchvision.datasets import CIFAR10


def write_cifar10(
    root: Path, per_batch: int = 20, test_size: int = 40, test_value: int = 250
) -> None:
    """A ``cifar-10-batches-py`` folder in the real format (pickled dicts, 3072-byte rows).

    Training images are random; every test pixel is ``test_value`` so that a statistic
    computed over the test set would be visible.
    """
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)

    def write(name: str, data: np.ndarray, labels: list[int]) -> None:
        entry = {
            "batch_label": name,
            "labels": labels,
            "data": data,
            "filenames": [f"{name}_{i}.png" for i in range(len(labels))],
        }
        with open(folder / name, "wb") as handle:
            pickle.dump(entry, handle)

    for b in range(1, 6):
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        write(f"data_batch_{b}", data, [int(v) for v in rng.integers(0, 10, per_batch)])
    write(
        "test_batch",
        np.full((test_size, 3072), test_value, np.uint8),
        [i % 10 for i in range(test_size)],
    )
    with open(folder / "batches.meta", "wb") as handle:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)], "num_vis": 3072}, handle)


def trust_written_cifar(monkeypatch: pytest.MonkeyPatch, root: Path) -> None:
    """Point torchvision's CIFAR-10 checksums at the files ``write_cifar10`` wrote.

    The loading path stays torchvision's own (integrity check included); only the expected
    md5 sums change, from those of the real download to those of the test's files.
    """
    folder = root / "cifar-10-batches-py"

    def md5(name: str) -> str:
        return hashlib.md5((folder / name).read_bytes()).hexdigest()

    monkeypatch.setattr(
        CIFAR10, "train_list", [[f"data_batch_{b}", md5(f"data_batch_{b}")] for b in range(1, 6)]
    )
    monkeypatch.setattr(CIFAR10, "test_list", [["test_batch", md5("test_batch")]])
    monkeypatch.setattr(
        CIFAR10,
        "meta",
        {"filename": "batches.meta", "key": "label_names", "md5": md5("batches.meta")},
    )


def write_image_folder(root: Path, per_class: int = 6, size: int = 12) -> None:
    """``root/train/<class>/*.png`` and ``root/test/<class>/*.png``: three coloured classes."""
    colours = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}
    rng = np.random.default_rng(1)
    for split, count in (("train", per_class), ("test", per_class // 2)):
        for name, colour in colours.items():
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                noise = rng.integers(-20, 20, (size, size, 3))
                pixels = np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
