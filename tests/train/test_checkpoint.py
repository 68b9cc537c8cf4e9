"""Checkpoints: atomic writes, weights-only loading, clear errors, every RNG state."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from invertible_train import checkpoint as ckpt
from invertible_train.checkpoint import (
    CheckpointError,
    CheckpointStore,
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)


class NotData:
    """An arbitrary object: loading it would need code, which weights_only refuses."""


def test_round_trip_and_no_temporary_files_left(tmp_path: Path) -> None:
    path = save_checkpoint({"w": torch.arange(3), "iteration": 7}, tmp_path / "c" / "last.pt")
    state = load_checkpoint(path)
    assert torch.equal(state["w"], torch.arange(3)) and state["iteration"] == 7
    assert state["format_version"] == ckpt.FORMAT_VERSION
    assert os.listdir(tmp_path / "c") == ["last.pt"]


def test_a_failed_write_keeps_the_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = save_checkpoint({"iteration": 1}, tmp_path / "last.pt")

    def crash(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.os, "fsync", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint({"iteration": 2}, path)
    monkeypatch.undo()
    assert load_checkpoint(path)["iteration"] == 1
    assert os.listdir(tmp_path) == ["last.pt"]


@pytest.mark.parametrize(
    "content",
    [b"", b"not a checkpoint at all", b"PK\x03\x04truncated zip"],
    ids=["empty", "garbage", "truncated"],
)
def test_corrupt_file_gives_a_clear_error_naming_it(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "last.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    assert str(path) in str(err.value) and "--fresh" in str(err.value)
    assert err.value.__cause__ is None  # no unpickler traceback chained


def test_truncated_real_checkpoint_is_reported(tmp_path: Path) -> None:
    path = save_checkpoint({"w": torch.randn(1000)}, tmp_path / "last.pt")
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(path)


def test_code_in_a_checkpoint_is_refused_without_advice_to_load_it_unsafely(
    tmp_path: Path,
) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"format_version": ckpt.FORMAT_VERSION, "x": NotData()}, path)
    with pytest.raises(CheckpointError, match="evil.pt") as err:
        load_checkpoint(path)
    message = str(err.value)
    assert "holds Python objects" in message and "NotData" in message
    assert "weights_only" not in message and "\x1b" not in message
    assert "\n" not in message


def test_foreign_and_future_checkpoints_are_refused(tmp_path: Path) -> None:
    torch.save({"model": {}}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not an invertible-train checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")
    torch.save({"format_version": 99}, tmp_path / "future.pt")
    with pytest.raises(CheckpointError, match="format version 99"):
        load_checkpoint(tmp_path / "future.pt")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")


def test_every_rng_state_survives_a_weights_only_round_trip(tmp_path: Path) -> None:
    random.seed(1)
    torch.manual_seed(2)
    np.random.seed(3)
    path = save_checkpoint({"rng": capture_rng_state()}, tmp_path / "rng.pt")
    expected = (random.random(), torch.rand(3), np.random.rand(3))
    random.seed(9)
    torch.manual_seed(9)
    np.random.seed(9)
    restore_rng_state(load_checkpoint(path)["rng"])
    assert random.random() == expected[0]
    assert torch.equal(torch.rand(3), expected[1])
    assert np.array_equal(np.random.rand(3), expected[2])


def test_each_new_last_checkpoint_keeps_the_one_before_as_previous(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "checkpoints")
    store.save_last({"iteration": 1})
    assert not store.previous.exists()
    store.save_last({"iteration": 2})
    store.save_last({"iteration": 3})
    assert load_checkpoint(store.last)["iteration"] == 3
    assert load_checkpoint(store.previous)["iteration"] == 2
    assert sorted(os.listdir(store.folder)) == ["last.pt", "previous.pt"]


def test_an_unusable_last_checkpoint_falls_back_to_the_previous_one(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "checkpoints")
    assert store.load_latest() is None
    store.save_last({"iteration": 5})
    store.save_last({"iteration": 9})
    state, path, skipped = store.load_latest()
    assert (state["iteration"], path, skipped) == (9, store.last, None)
    store.last.write_bytes(store.last.read_bytes()[:-200])  # truncated
    state, path, skipped = store.load_latest()
    assert state["iteration"] == 5 and path == store.previous
    assert skipped is not None and "last.pt is corrupt" in skipped
    # the unusable file is kept aside, out of the rotation's way
    assert (store.folder / "last.pt.unusable").exists() and not store.last.exists()
    store.save_last({"iteration": 6})
    assert load_checkpoint(store.previous)["iteration"] == 5


def test_a_kill_between_the_two_renames_leaves_the_previous_checkpoint(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "checkpoints")
    store.save_last({"iteration": 4})
    store.last.rename(store.previous)  # the old last moved, the new one not yet in place
    (store.folder / ".last.pt.x1.tmp").write_bytes(b"half")
    state, path, skipped = store.load_latest()
    assert state["iteration"] == 4 and path == store.previous and skipped is None
    assert not list(store.folder.glob(".*.tmp"))


def test_when_no_checkpoint_is_usable_the_error_names_both(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "checkpoints")
    store.folder.mkdir()
    store.last.write_bytes(b"garbage")
    store.previous.write_bytes(b"")
    with pytest.raises(CheckpointError) as err:
        store.load_latest()
    message = str(err.value)
    assert "last.pt" in message and "previous.pt" in message and "--fresh" in message
