"""Datasets, sampler and augmentation: hygiene, determinism, clear errors."""

from __future__ import annotations

import sys
import urllib.error
from pathlib import Path

import pytest
import torch
from torch.utils.data import DistributedSampler

from invertible_train.config import ConfigError, DataConfig
from invertible_train.data import (
    DIGITS_LEVELS,
    DIGITS_TEST_SIZE,
    BatchTransform,
    DatasetUnavailableError,
    InMemoryImages,
    ResumableSampler,
    augment_batch,
    build_data,
    channel_stats,
    check_dataset_name,
    digits_images,
    make_loader,
    synthetic_images,
)

from .datasets import trust_written_cifar, write_cifar10, write_image_folder


def test_synthetic_images_are_uint8_cifar_shaped_and_class_dependent() -> None:
    images, labels = synthetic_images(400, 10, 32, seed=1)
    assert images.shape == (400, 3, 32, 32) and images.dtype == torch.uint8
    assert labels.min() >= 0 and labels.max() < 10
    # class means differ far more than the noise of a class mean over 40 images
    means = torch.stack([images[labels == c].float().mean(0) for c in range(10)])
    assert (means[0] - means[1]).abs().mean() > 5
    again, _ = synthetic_images(400, 10, 32, seed=1)
    assert torch.equal(images, again)
    other, _ = synthetic_images(400, 10, 32, seed=2)
    assert not torch.equal(images, other)


@pytest.mark.parametrize(("replicas", "length"), [(1, 10), (2, 10), (3, 10)])
def test_sampler_order_matches_distributed_sampler(replicas: int, length: int) -> None:
    data = list(range(length))
    for rank in range(replicas):
        ours = ResumableSampler(length, seed=5, num_replicas=replicas, rank=rank)
        theirs = DistributedSampler(data, num_replicas=replicas, rank=rank, seed=5)
        for epoch in (0, 3):
            ours.set_epoch(epoch)
            theirs.set_epoch(epoch)
            assert list(ours) == list(theirs)
            assert len(ours) == len(theirs)


def test_sampler_resumes_mid_epoch_with_the_same_order() -> None:
    sampler = ResumableSampler(12, seed=3)
    sampler.set_epoch(2)
    full = list(sampler)
    sampler.set_epoch(2, start_index=5)
    assert list(sampler) == full[5:] and len(sampler) == 7
    sampler.set_epoch(3)
    assert list(sampler) != full
    assert list(ResumableSampler(4, shuffle=False)) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="rank 2"):
        ResumableSampler(4, num_replicas=2, rank=2)


def test_augmentation_is_pad_crop_and_flip_and_depends_only_on_the_seed() -> None:
    images = torch.arange(2 * 3 * 6 * 6, dtype=torch.uint8).view(2, 3, 6, 6)
    out = augment_batch(images, torch.Generator().manual_seed(0), padding=2, flip=True)
    again = augment_batch(images, torch.Generator().manual_seed(0), padding=2, flip=True)
    assert torch.equal(out, again) and out.shape == images.shape
    # no augmentation when switched off
    assert torch.equal(augment_batch(images, torch.Generator(), padding=0, flip=False), images)
    # every crop is a window of the zero-padded image, possibly mirrored
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    for n in range(2):
        windows = [padded[n, :, y : y + 6, x : x + 6] for y in range(5) for x in range(5)]
        candidates = windows + [w.flip(2) for w in windows]
        assert any(torch.equal(out[n], w) for w in candidates)


def test_batch_transform_augments_training_batches_only() -> None:
    images, _ = synthetic_images(8, 2, 8, seed=0)
    transform = BatchTransform([0.5] * 3, [0.25] * 3, torch.device("cpu"), seed=1)
    test_view = transform.test(images)
    assert torch.allclose(test_view, (images.float() / 255 - 0.5) / 0.25)
    assert not torch.equal(transform.train(images, iteration=0), test_view)
    assert torch.equal(transform.train(images, 4), transform.train(images, 4))
    assert not torch.equal(transform.train(images, 4), transform.train(images, 5))
    plain = BatchTransform([0.5] * 3, [0.25] * 3, torch.device("cpu"), augment=False)
    assert torch.equal(plain.train(images, 0), plain.test(images))


def test_channel_stats_of_a_known_dataset() -> None:
    images = torch.zeros(4, 3, 2, 2, dtype=torch.uint8)
    images[:2] = 255
    mean, std = channel_stats(InMemoryImages(images, torch.zeros(4, dtype=torch.int64)))
    assert mean == pytest.approx((0.5,) * 3) and std == pytest.approx((0.5,) * 3)


def test_in_memory_images_validate_and_batch_in_one_gather() -> None:
    images, labels = synthetic_images(10, 2, 4, seed=0)
    data = InMemoryImages(images, labels)
    image, label = data[3]
    assert torch.equal(image, images[3]) and label == int(labels[3])
    batch = next(iter(make_loader(data, 4, sampler=ResumableSampler(10, shuffle=False))))
    assert torch.equal(batch[0], images[:4]) and torch.equal(batch[1], labels[:4])
    with pytest.raises(ValueError, match="uint8"):
        InMemoryImages(images.float(), labels)
    with pytest.raises(ValueError, match="labels"):
        InMemoryImages(images, labels[:3])


def test_cifar10_loads_through_torchvision_with_training_statistics_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_cifar10(tmp_path, per_batch=20, test_size=40, test_value=250)
    trust_written_cifar(monkeypatch, tmp_path)
    data = build_data(DataConfig(dataset="cifar10", data_dir=str(tmp_path)))
    assert len(data.train) == 100 and len(data.test) == 40 and data.num_classes == 10
    assert data.levels == 256
    # random training pixels average 127.5/255; the all-250 test set must not move that
    assert data.mean == pytest.approx((0.5,) * 3, abs=0.03)
    assert data.std == pytest.approx((0.289,) * 3, abs=0.03)
    image, _ = data.test[0]
    assert image.shape == (3, 32, 32) and int(image.min()) == 250


def test_cifar_offline_error_says_where_to_put_the_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def offline(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("no network")

    monkeypatch.setattr("torchvision.datasets.cifar.download_and_extract_archive", offline)
    with pytest.raises(DatasetUnavailableError) as err:
        build_data(DataConfig(dataset="cifar10", data_dir=str(tmp_path)))
    message = str(err.value)
    assert str(tmp_path / "cifar-10-batches-py") in message
    assert "cifar-10-python.tar.gz" in message and "download failed" in message
    with pytest.raises(DatasetUnavailableError, match="downloading is off.*cifar-100-python"):
        build_data(DataConfig(dataset="cifar100", data_dir=str(tmp_path), download=False))


def test_image_folder_is_resized_and_its_classes_kept(tmp_path: Path) -> None:
    write_image_folder(tmp_path / "pets", per_class=4, size=12)
    data = build_data(DataConfig(dataset=f"imagefolder:{tmp_path / 'pets'}", image_size=8))
    assert data.num_classes == 3 and len(data.train) == 12 and len(data.test) == 6
    image, label = data.train[0]
    assert image.shape == (3, 8, 8) and image.dtype == torch.uint8 and label == 0
    assert image[2].float().mean() > image[0].float().mean()  # class 0 is "blue" (sorted)


def test_image_folder_errors_name_the_missing_parts(tmp_path: Path) -> None:
    (tmp_path / "only" / "train" / "a").mkdir(parents=True)
    with pytest.raises(DatasetUnavailableError, match="missing: test"):
        build_data(DataConfig(dataset=f"imagefolder:{tmp_path / 'only'}"))
    (tmp_path / "only" / "test" / "a").mkdir(parents=True)
    with pytest.raises(DatasetUnavailableError, match="imagefolder:"):
        build_data(DataConfig(dataset=f"imagefolder:{tmp_path / 'only'}"))
    write_image_folder(tmp_path / "mixed", per_class=2)
    (tmp_path / "mixed" / "test" / "red").rename(tmp_path / "mixed" / "test" / "pink")
    with pytest.raises(DatasetUnavailableError, match="same class subfolders"):
        build_data(DataConfig(dataset=f"imagefolder:{tmp_path / 'mixed'}"))


def test_unknown_dataset_is_a_config_error_listing_the_known_ones() -> None:
    with pytest.raises(ConfigError, match="data.dataset must be one of cifar10, cifar100, digits"):
        build_data(DataConfig(dataset="mnist"))
    with pytest.raises(
        ConfigError, match="imagefolder:PATH, shapes2d, shapes3d, masks:PATH; got 'imagefolder:'"
    ):
        check_dataset_name("imagefolder:")
    check_dataset_name("imagefolder:/some/where")


def test_digits_are_real_8x8_scans_split_once_for_all_runs() -> None:
    pytest.importorskip("sklearn")
    data = build_data(DataConfig(dataset="digits"))
    assert len(data.train) == 1437 and len(data.test) == DIGITS_TEST_SIZE == 360
    assert data.num_classes == 10 and data.channels == 1
    assert data.levels == DIGITS_LEVELS == 17  # the scans' grey values 0..16
    assert len(torch.unique(data.train.images)) == 17  # type: ignore[attr-defined]
    image, label = data.train[0]
    assert image.shape == (1, 8, 8) and image.dtype == torch.uint8 and 0 <= label < 10
    train, test = digits_images()
    assert torch.equal(train.images, data.train.images)  # type: ignore[attr-defined]
    assert int(train.images.max()) == 255 and int(train.images.min()) == 0
    # every scan once: the two splits are disjoint and make up the whole dataset
    from sklearn.datasets import load_digits

    everything = {bytes(x.numpy()) for x in torch.cat([train.images, test.images])}
    assert len(everything) == len({bytes(row) for row in load_digits().data.astype("uint8")})
    assert set(test.labels.tolist()) == set(range(10))
    # normalisation from the training scans only
    assert data.mean == pytest.approx((float(train.images.double().mean()) / 255,), rel=1e-6)


def test_digits_without_scikit_learn_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(DatasetUnavailableError, match=r"pip install 'invertible-train\[digits\]'"):
        build_data(DataConfig(dataset="digits"))


def test_starting_an_epoch_draws_nothing_from_torchs_random_generator() -> None:
    """A stock DataLoader draws its workers' base seed from the global generator at each
    epoch's start, shifting the random numbers a model draws (dropout, a flow's noise) by
    where epochs begin and where a run resumed; the harness's loaders have their own."""
    images = torch.zeros(8, 1, 2, 2, dtype=torch.uint8)
    loader = make_loader(InMemoryImages(images, torch.zeros(8)), 4, sampler=ResumableSampler(8))
    torch.manual_seed(0)
    expected = torch.rand(2)
    torch.manual_seed(0)
    for _ in range(3):
        assert len(list(loader)) == 2
    assert torch.equal(torch.rand(2), expected)


def test_a_batch_transform_refuses_levels_no_uint8_image_can_hold() -> None:
    for levels in (1, 257):
        with pytest.raises(ValueError, match=r"levels must be in \[2, 256\]"):
            BatchTransform([0.5], [0.25], torch.device("cpu"), levels=levels)
