"""Sharded checkpoints (``--fsdp``): one folder per checkpoint, written by every process.

A sharded model has no process that holds all of it, so each process writes its own shards
of the parameters and of the optimizer state with ``torch.distributed.checkpoint`` (DCP):
``checkpoints/last.dcp/`` holds DCP's files (``.metadata`` and one ``__RANK_0.distcp`` per
process) and ``state.pt``, the rest of the run's state (iteration, sampler position, random
states, schedule, scaler, config, and the few non-tensor entries of the optimizer's state,
its learning rates), written by the main process with ``torch.save``. The model's buffers
(BatchNorm statistics) are the main process's, as under DDP: they are broadcast before each
save.

The rules of the single-file checkpoints (:mod:`invertible_train.checkpoint`) hold:

- **atomic**: every process writes into a hidden temporary folder (``.last.dcp.XXXX.tmp``)
  that is renamed to ``last.dcp`` once DCP's metadata (written last, after every process
  has written its files, each ``fsync``-ed) and ``state.pt`` are complete. A checkpoint
  folder is complete or absent; a kill leaves at worst a temporary folder, deleted when the
  run resumes. A folder that is replaced (``previous.dcp``, ``best.dcp``) is first renamed
  to a hidden ``.NAME.XXXX.old`` and deleted after; a kill between the renames puts it back.
- **rotation**: each new ``last.dcp`` moves the one before it to ``previous.dcp``, which
  the run resumes from when ``last.dcp`` is unusable; ``best.dcp`` is the best evaluated
  model.
- **data, never code**: DCP reads its ``.metadata`` with ``pickle`` and non-tensor entries
  with ``torch.load(weights_only=False)``, either of which would run code a crafted file
  holds. Here ``.metadata`` is read by an unpickler that builds only DCP's metadata classes,
  torch sizes, dtypes and layouts (anything else is refused before it is built), a
  checkpoint whose entries are not all tensors is refused, and DCP loads tensors
  (``weights_only=True``) into the state dicts the run already has; ``state.pt`` loads with
  ``weights_only=True``.
- **never silently lost**: an unusable ``last.dcp`` (no metadata, a truncated shard file, a
  ``state.pt`` that does not load) is passed over for ``previous.dcp`` and set aside as
  ``last.dcp.unusable`` (``.1``, ``.2``, ... never replacing an earlier one).

Every process must see the same folder (one machine, or a file system the machines share):
a process that cannot see the folder another made is refused at the first save.
Resuming needs as many processes as wrote the checkpoint (as for every run); evaluating
(``invertible-eval``) reads a sharded checkpoint into the whole model in one process.
"""

from __future__ import annotations

import io
import os
import pickle
import shutil
import tempfile
import uuid
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from invertible_train.checkpoint import (
    FIX,
    CheckpointError,
    CheckpointFolder,
    fsync_folder,
    load_checkpoint,
    save_checkpoint,
)
from invertible_train.distributed import run_on_main
from invertible_train.sharding import reshard

if TYPE_CHECKING:
    from torch.distributed.checkpoint.metadata import Metadata

__all__ = [
    "LAYOUT",
    "STATE_FILE",
    "ShardedCheckpointStore",
    "load_sharded_state",
    "read_metadata",
    "read_tensors",
]

#: ``state["layout"]`` of a sharded checkpoint's ``state.pt``.
LAYOUT = "sharded"
#: the main process's part of a sharded checkpoint: everything but the tensors.
STATE_FILE = "state.pt"
#: the file DCP's ``FileSystemWriter`` writes its metadata to, last.
METADATA_FILE = ".metadata"


# -- reading DCP's metadata without running code ----------------------------------------------

_DCP_METADATA_CLASSES = frozenset(
    {
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "Metadata",
        "MetadataIndex",
        "StorageMeta",
        "TensorProperties",
        "TensorStorageMetadata",
        "_MEM_FORMAT_ENCODING",
    }
)
_PATH_CLASSES = frozenset({"Path", "PosixPath", "PurePosixPath", "PureWindowsPath", "WindowsPath"})


def _allowed(module: str, name: str) -> bool:
    """Whether ``module.name`` may be built while reading DCP's metadata (data classes of
    DCP's metadata, torch's ``Size``, dtypes and layouts, paths): nothing that runs code."""
    if module == "torch.distributed.checkpoint.metadata":
        return name in _DCP_METADATA_CLASSES
    if module == "torch.distributed.checkpoint.filesystem":
        return name == "_StorageInfo"
    if module == "torch":
        return name == "Size" or isinstance(getattr(torch, name, None), torch.dtype)
    if module == "torch.serialization":
        return name == "_get_layout"  # a layout by its name, as torch's own safe loader allows
    if module == "pathlib":
        return name in _PATH_CLASSES
    return module == "collections" and name == "OrderedDict"


class _MetadataUnpickler(pickle.Unpickler):
    """Builds the globals :func:`_allowed` lists and refuses any other."""

    def find_class(self, module: str, name: str) -> Any:
        if not _allowed(module, name):
            raise pickle.UnpicklingError(f"it asks for {module}.{name}, which is not data")
        return super().find_class(module, name)


def _allowed_classes() -> list[type]:
    from torch.distributed.checkpoint import filesystem, metadata

    return [getattr(metadata, name) for name in _DCP_METADATA_CLASSES] + [filesystem._StorageInfo]


def _unpickle_metadata(data: bytes) -> Any:
    """Unpickle DCP metadata with :class:`_MetadataUnpickler`, the allowed classes left as
    they were (a pickle may set attributes on a class it names; they are put back and the
    file refused)."""
    classes = _allowed_classes()
    before = [dict(vars(cls)) for cls in classes]
    try:
        return _MetadataUnpickler(io.BytesIO(data)).load()
    finally:
        changed = False
        for cls, attributes in zip(classes, before, strict=True):
            now = vars(cls)
            for key in [k for k in now if k not in attributes]:
                delattr(cls, key)
                changed = True
            for key, value in attributes.items():
                if now.get(key) is not value:
                    setattr(cls, key, value)
                    changed = True
        if changed:
            raise pickle.UnpicklingError("it changes the classes it builds")


def read_metadata(folder: Path) -> Metadata:
    """DCP's metadata of the checkpoint ``folder``, read without running code: a file that
    asks for anything but metadata raises :class:`CheckpointError`, as does a missing one
    or one that is not DCP's."""
    from torch.distributed.checkpoint.metadata import Metadata

    path = folder / METADATA_FILE
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(
            f"checkpoint {folder} has no readable {METADATA_FILE} ({exc.strerror or exc}); {FIX}"
        ) from None
    try:
        metadata = _unpickle_metadata(data)
    except Exception as exc:  # the unpickler raises many types; all mean "unusable"
        reason = str(exc) if isinstance(exc, pickle.UnpicklingError) else type(exc).__name__
        raise CheckpointError(
            f"checkpoint {folder} has a {METADATA_FILE} that is not DCP's metadata ({reason}); "
            f"{FIX}"
        ) from None
    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"checkpoint {folder}: {METADATA_FILE} is not DCP's metadata; {FIX}")
    return metadata


def _check_contents(folder: Path, metadata: Metadata) -> None:
    """Refuse a checkpoint with a non-tensor entry (DCP would unpickle it with full pickle),
    or whose shard files are missing or shorter than its metadata says (a copy cut short)."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    others = sorted(
        key
        for key, entry in metadata.state_dict_metadata.items()
        if not isinstance(entry, TensorStorageMetadata)
    )
    if others:
        raise CheckpointError(
            f"checkpoint {folder} holds entries that are not tensors ({', '.join(others[:3])}), "
            f"which would load as Python objects; {FIX}"
        )
    ends: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        name = str(info.relative_path)
        ends[name] = max(ends.get(name, 0), int(info.offset) + int(info.length))
    for name, end in sorted(ends.items()):
        shard = folder / name
        if Path(name).name != name or not shard.is_file() or shard.stat().st_size < end:
            raise CheckpointError(
                f"checkpoint {folder} is incomplete: its shard {name} is missing or shorter "
                f"than its metadata says; {FIX}"
            )


def _safe_reader(folder: Path) -> Any:
    """DCP's ``FileSystemReader`` for ``folder``, reading the metadata with
    :func:`read_metadata` (tensors it already loads with ``weights_only=True``)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
            metadata = read_metadata(folder)
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            assert metadata.storage_meta is not None
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(folder)


def _tensors_only_planner(flatten: bool = True) -> Any:
    """DCP's default load planner, refusing a non-tensor entry instead of unpickling it
    (``flatten=False``: the state dict is already flat, keyed as DCP's metadata is)."""
    from torch.distributed.checkpoint import DefaultLoadPlanner

    class TensorsOnly(DefaultLoadPlanner):
        def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
            raise CheckpointError(
                f"a checkpoint entry ({read_item.dest_index.fqn}) is not a tensor; {FIX}"
            )

    return TensorsOnly(flatten_state_dict=flatten)


# -- the state: tensors to DCP, the rest to state.pt ------------------------------------------


def _split(tree: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(tensors, rest)``: the tensor leaves of nested dicts, and everything else."""
    tensors: dict[str, Any] = {}
    rest: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Tensor):
            tensors[key] = value
        elif isinstance(value, Mapping):
            inner_tensors, inner_rest = _split(value)
            if inner_tensors:
                tensors[key] = inner_tensors
            if inner_rest or not inner_tensors:
                rest[key] = inner_rest
        else:
            rest[key] = value
    return tensors, rest


def _merge(tensors: Mapping[str, Any], rest: Mapping[str, Any]) -> dict[str, Any]:
    """Undo :func:`_split`."""
    merged: dict[str, Any] = dict(rest)
    for key, value in tensors.items():
        if isinstance(value, Mapping):
            inner = rest.get(key, {})
            merged[key] = _merge(value, inner if isinstance(inner, Mapping) else {})
        else:
            merged[key] = value
    return merged


def _model_and_optimizer(
    model: nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The model's state dict as ``model.state_dict()`` gives it (a sharded model: each
    process's shards; the keys its state-dict hooks make, as in ``last.pt``) and the
    optimizer's by parameter name
    (``torch.distributed.checkpoint.state_dict.get_optimizer_state_dict``; a fresh
    optimizer's state is made to exist, so that it can be loaded into)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    reshard(model)  # the shards, not parameters a forward without backward left gathered
    optimizer_state = get_optimizer_state_dict(model, optimizer)
    return dict(model.state_dict()), dict(optimizer_state)


def load_sharded_state(
    folder: Path, state: Mapping[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer
) -> None:
    """Load the sharded checkpoint ``folder`` (whose ``state.pt`` is ``state``) into
    ``model`` and ``optimizer``; every process of the job calls it (one process: the whole
    model, whatever number of processes wrote it).

    Tensors load in place into the state dicts the model and the optimizer have; the
    optimizer's other entries come from ``state``. Raises :class:`CheckpointError` when the
    checkpoint does not fit them (other parameters, other shapes).
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    model_state, optimizer_state = _model_and_optimizer(model, optimizer)
    tensors = {"model": _split(model_state)[0], "optimizer": _split(optimizer_state)[0]}
    saved = state.get("sharded_state")
    if not isinstance(saved, Mapping):
        raise CheckpointError(f"checkpoint {folder} has no sharded state in {STATE_FILE}; {FIX}")
    try:
        with _in_one_process_on_purpose():
            dcp.load(
                tensors,
                storage_reader=_safe_reader(folder),
                planner=_tensors_only_planner(),
                no_dist=_one_process(),
            )
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # DCP gathers every process's failure into a BaseException
        raise CheckpointError(
            f"checkpoint {folder} does not fit this experiment ({_why(exc)}); {FIX}"
        ) from None
    model.load_state_dict(_merge(tensors["model"], saved.get("model", {})))
    set_optimizer_state_dict(
        model, optimizer, optim_state_dict=_merge(tensors["optimizer"], saved.get("optimizer", {}))
    )


def _why(exc: BaseException) -> str:
    """What went wrong, in one line: the first failing process's error when DCP gathered
    them (a ``CheckpointException``), else ``exc`` itself."""
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict) and failures:
        rank, (error, _) = sorted(failures.items(), key=lambda item: item[0])[0]
        if isinstance(error, CheckpointError):
            return str(error).split(f"; {FIX}")[0]
        where = "" if _one_process() else f"process {rank}: "
        exc = error
    else:
        where = ""
    text = str(exc).strip().splitlines()
    return f"{where}{type(exc).__name__}: {text[0][:200] if text else ''}"


def _one_process() -> bool:
    return not (dist.is_available() and dist.is_initialized())


@contextmanager
def _in_one_process_on_purpose() -> Iterator[None]:
    """DCP warns whenever it runs without a process group; here that is meant (one process
    writes or reads the whole checkpoint), so the notice is not shown."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def read_tensors(folder: Path) -> dict[str, Tensor]:
    """Every tensor of the sharded checkpoint ``folder``, whole, by DCP's flat key
    (``model.head.fc.weight``, ``optimizer.state.head.fc.weight.momentum_buffer``), read
    in one process as :meth:`ShardedCheckpointStore.read` validates it: to inspect a
    checkpoint or compare two."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    metadata = read_metadata(folder)
    _check_contents(folder, metadata)
    tensors: dict[str, Tensor] = {}
    for key, entry in metadata.state_dict_metadata.items():
        assert not isinstance(entry, BytesStorageMetadata)  # _check_contents refused them
        tensors[key] = torch.empty(entry.size, dtype=entry.properties.dtype)
    with _in_one_process_on_purpose():
        dcp.load(
            tensors,
            storage_reader=_safe_reader(folder),
            planner=_tensors_only_planner(flatten=False),
            no_dist=True,
        )
    return tensors


# -- the folder --------------------------------------------------------------------------------


def _replace_folder(source: Path, destination: Path) -> None:
    """Rename the folder ``source`` to ``destination``; a ``destination`` already there
    goes to a hidden ``.NAME.XXXX.old`` first and is deleted after (put back by
    :meth:`ShardedCheckpointStore.remove_stale` after a kill between the renames)."""
    old = None
    if destination.exists():
        old = destination.with_name(f".{destination.name}.{uuid.uuid4().hex[:8]}.old")
        os.replace(destination, old)
    os.replace(source, destination)
    fsync_folder(destination.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _every_process_sees(folder: Path) -> None:
    """Raise :class:`CheckpointError` on every process when one cannot see ``folder``."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    seen: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(seen, folder.is_dir())
    blind = [rank for rank, ok in enumerate(seen) if not ok]
    if blind:
        raise CheckpointError(
            f"process(es) {', '.join(map(str, blind))} cannot see {folder}, which process 0 "
            "made: a sharded checkpoint (--fsdp) is written by every process into one folder, "
            "so --results-dir must be on a file system every process shares"
        )


class ShardedCheckpointStore(CheckpointFolder):
    """The ``checkpoints/`` folder of a sharded run: ``last.dcp``, ``previous.dcp`` and
    ``best.dcp``, each a folder (see the module docstring).

    :meth:`save_last` and :meth:`save_best` are called by every process together;
    :meth:`latest`, :meth:`read`, :meth:`set_aside` and :meth:`remove_stale` by the main
    process.
    """

    suffix = ".dcp"
    other_suffix = ".pt"

    def save_last(
        self, state: Mapping[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer
    ) -> Path:
        """Write ``last.dcp`` (every process), keeping the one it replaces as
        ``previous.dcp``. ``state`` is the run's state but the model's and the optimizer's
        (the main process's is the one written)."""
        return self._save(state, model, optimizer, self.last, self.previous)

    def save_best(
        self, state: Mapping[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer
    ) -> Path:
        """Write ``best.dcp`` (every process), as :meth:`save_last` writes ``last.dcp``."""
        return self._save(state, model, optimizer, self.best, None)

    def _save(
        self,
        state: Mapping[str, Any],
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        target: Path,
        keep_previous: Path | None,
    ) -> Path:
        import torch.distributed.checkpoint as dcp

        model_state, optimizer_state = _model_and_optimizer(model, optimizer)
        model_tensors, model_rest = _split(model_state)
        optimizer_tensors, optimizer_rest = _split(optimizer_state)

        def make_folder() -> str:
            self.folder.mkdir(parents=True, exist_ok=True)
            return tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=self.folder)

        partial = Path(run_on_main(make_folder))
        try:
            _every_process_sees(partial)
            with _in_one_process_on_purpose():
                dcp.save(
                    {"model": model_tensors, "optimizer": optimizer_tensors},
                    storage_writer=_writer(partial),
                    no_dist=_one_process(),
                )

            def finish() -> None:
                whole = {
                    **state,
                    "layout": LAYOUT,
                    "sharded_state": {"model": model_rest, "optimizer": optimizer_rest},
                }
                save_checkpoint(whole, partial / STATE_FILE)
                if keep_previous is not None and target.exists():
                    _replace_folder(target, keep_previous)
                _replace_folder(partial, target)

            run_on_main(finish)
        except BaseException as exc:
            if _one_process() or dist.get_rank() == 0:
                shutil.rmtree(partial, ignore_errors=True)
            if isinstance(exc, (KeyboardInterrupt, SystemExit, CheckpointError)):
                raise
            # DCP gathers every process's failure into a BaseException; one line instead
            raise CheckpointError(
                f"writing checkpoint {target} failed ({_why(exc)}); the checkpoints written "
                "before it are kept"
            ) from None
        return target

    def read(self, path: Path) -> dict[str, Any]:
        """``state.pt`` of the checkpoint folder ``path``, once its metadata reads as data,
        lists only tensors, and its shard files are all there and long enough."""
        if not path.is_dir():
            raise CheckpointError(
                f"checkpoint {path} is not a folder of a sharded checkpoint; {FIX}"
            )
        state = load_checkpoint(path / STATE_FILE)
        if state.get("layout") != LAYOUT:
            raise CheckpointError(f"{path} is not a sharded checkpoint of invertible-train; {FIX}")
        _check_contents(path, read_metadata(path))
        return state

    def remove_stale(self) -> None:
        """Delete the temporary folders a kill left mid-write, and put back a checkpoint a
        kill caught between being moved out of the way and the new one moving in."""
        for kept in (self.last, self.previous, self.best):
            moved = sorted(self.folder.glob(f".{kept.name}.*.old"))
            if moved and not kept.exists():
                os.replace(moved[-1], kept)
        for stale in [*self.folder.glob(".*.dcp.*.tmp"), *self.folder.glob(".*.dcp.*.old")]:
            if stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale, ignore_errors=True)


def _writer(folder: Path) -> Any:
    """DCP's ``FileSystemWriter`` into ``folder``: one file per process, each ``fsync``-ed."""
    from torch.distributed.checkpoint import FileSystemWriter

    return FileSystemWriter(folder, single_file_per_rank=True, sync_files=True)
