"""The file layer of checkpoint IO: find a checkpoint's files, read tensors from them, write them.

Nothing here knows about models. `resolve_checkpoint` turns a local folder or a Hub id into a
`Checkpoint` (which files hold what), `open_tensors` reads its tensors one at a time, and
`save_safetensors` writes tensors in the layout `transformers` reads.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import re
import shutil
import sys
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

import ml_dtypes
import numpy as np
import safetensors
import safetensors.numpy

from flaxauto.converters.buffers import ALIGNMENT, aligned_empty, read_into
from flaxauto.converters.errors import CheckpointError
from flaxauto.converters.flax_checkpoints import (
    FLAX_INDEX,
    FLAX_WEIGHTS,
    FlaxMsgpackFile,
    FlaxSafetensorsFile,
    index_key_name,
)

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
BIN_WEIGHTS = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
CONFIG = "config.json"
GENERATION_CONFIG = "generation_config.json"

# in order of preference; transformers 4 Flax's last (see converters.flax_checkpoints)
_WEIGHT_NAMES = (SAFE_WEIGHTS, SAFE_INDEX, BIN_WEIGHTS, BIN_INDEX, FLAX_WEIGHTS, FLAX_INDEX)
_SHARD_NAME = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
_LOCAL_PREFIXES = ("./", "../", "~", ".\\", "..\\")


@dataclass(frozen=True)
class Checkpoint:
    directory: Path
    config_path: Path
    format: str  # "safetensors", "bin" or "flax" (msgpack)
    weight_files: tuple[Path, ...]
    weight_map: dict[str, Path] | None = field(hash=False)  # tensor -> shard; None: one file
    generation_config_path: Path | None


# ----------------------------------------------------------------------------- finding files


def resolve_checkpoint(
    name_or_path,
    *,
    revision=None,
    cache_dir=None,
    token=None,
    local_files_only=None,
    subfolder: str | None = None,
    variant: str | None = None,
) -> Checkpoint:
    """Find config and weights in a local directory, or else in a Hugging Face Hub repo.

    subfolder: the checkpoint lies in this folder of the directory or repo. variant: read
    weights named as transformers names a variant, e.g. "fp16": model.fp16.safetensors,
    model.safetensors.index.fp16.json, pytorch_model.fp16.bin (and only those)."""
    text = os.fspath(name_or_path)
    path = Path(text).expanduser().absolute()
    if path.is_dir():
        folder = path / subfolder if subfolder else path
        if not folder.is_dir():
            raise CheckpointError(f"{path}: no subfolder {subfolder!r}")

        def fetch(name: str) -> Path | None:
            return folder / name if (folder / name).is_file() else None

        return _locate(fetch, str(folder), variant=variant)
    looks_local = os.path.isabs(text) or os.path.exists(text) or text.startswith(_LOCAL_PREFIXES)
    if looks_local or isinstance(name_or_path, os.PathLike):
        raise CheckpointError(f"{text}: no such directory (expected a checkpoint folder)")
    return _resolve_from_hub(
        text, revision, cache_dir, token, local_files_only, subfolder=subfolder, variant=variant
    )


def variant_name(name: str, variant: str | None) -> str:
    """transformers' name for a variant of a weights file: model.safetensors -> model.fp16.
    safetensors, model.safetensors.index.json -> model.safetensors.index.fp16.json."""
    if not variant:
        return name
    stem, extension = name.rsplit(".", 1)
    return f"{stem}.{variant}.{extension}"


def _locate(
    fetch: Callable[[str], Path | None], where: str, hint: str = "", variant: str | None = None
) -> Checkpoint:
    """Pick config and weights; `fetch(name)` gives a file's local path, or None if it is absent."""
    config = fetch(CONFIG)
    if config is None:
        raise CheckpointError(f"{where}: no {CONFIG} found{hint}")
    found = _first_weights(fetch, variant)
    if found is None:
        names = ", ".join(variant_name(name, variant) for name in _WEIGHT_NAMES)
        raise CheckpointError(f"{where}: no weights; looked for {names}{hint}")
    kind, weights = found  # kind: the file's name without the variant
    weight_map = _read_index(weights, fetch) if kind.endswith(".index.json") else None
    format = "safetensors" if kind.startswith(SAFE_WEIGHTS) else "bin"
    if kind.startswith(FLAX_WEIGHTS):
        format = "flax"
        if weight_map is not None:  # its keys are Flax paths: "bert/pooler/dense/kernel"
            weight_map = {index_key_name(key): path for key, path in weight_map.items()}
    return Checkpoint(
        directory=config.parent,
        config_path=config,
        format=format,
        # Shard names carry their number: sorted, they come in the order they were written.
        weight_files=(weights,) if weight_map is None else tuple(sorted({*weight_map.values()})),
        weight_map=weight_map,
        generation_config_path=fetch(GENERATION_CONFIG),
    )


def _first_weights(fetch, variant) -> tuple[str, Path] | None:
    for kind in _WEIGHT_NAMES:
        if (weights := fetch(variant_name(kind, variant))) is not None:
            return kind, weights
    return None


def _read_index(index_path: Path, fetch: Callable[[str], Path | None]) -> dict[str, Path]:
    """Parse a sharded index and fetch its shards, reporting every problem at once."""
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CheckpointError(f"{index_path}: not a readable JSON index ({e})") from e
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        raise CheckpointError(f'{index_path}: expected a JSON object with a "weight_map" object')
    problems = [f"{k!r} maps to {v!r}" for k, v in weight_map.items() if not isinstance(v, str)]
    shards = {v: fetch(v) for v in sorted({v for v in weight_map.values() if isinstance(v, str)})}
    problems += [f"shard {name!r} is missing" for name, path in shards.items() if path is None]
    if problems:
        raise CheckpointError(f"{index_path}: bad sharded index: " + "; ".join(problems))
    return {key: shards[name] for key, name in weight_map.items()}


def _resolve_from_hub(
    repo_id, revision, cache_dir, token, local_files_only, *, subfolder=None, variant=None
) -> Checkpoint:
    from huggingface_hub import constants, errors, hf_hub_download

    offline = _offline_from_env() if local_files_only is None else bool(local_files_only)
    where = f"Hub repo {repo_id!r}" + (f" at revision {revision!r}" if revision else "")
    where += f", subfolder {subfolder!r}" if subfolder else ""
    cache = cache_dir or constants.HF_HUB_CACHE
    hint = f" (offline: looked only in the Hugging Face cache {cache})" if offline else ""
    options = dict(revision=revision, cache_dir=cache_dir, token=token, local_files_only=offline)
    if subfolder:
        options["subfolder"] = subfolder

    def fetch(name: str) -> Path | None:
        try:
            return Path(hf_hub_download(repo_id, name, **options))
        except errors.EntryNotFoundError as e:  # not in the repo, or not in the cache if offline
            if name == CONFIG:  # the first lookup: say why the whole repo is unavailable
                reason = hint or f": {_line(e)}"  # offline, the hub's own reason is just noise
                raise CheckpointError(f"{where}: cannot get {CONFIG}{reason}") from e
            return None
        except errors.RevisionNotFoundError as e:
            raise CheckpointError(f"{where}: no such revision") from e
        except errors.RepositoryNotFoundError as e:
            raise CheckpointError(f"{where}: repository not found, or private (pass token=)") from e
        except (errors.HFValidationError, errors.HfHubHTTPError, OSError) as e:
            raise CheckpointError(f"{where}: cannot get {name}: {_line(e)}") from e

    return _locate(fetch, where, hint, variant)


def _offline_from_env() -> bool:
    """huggingface_hub reads HF_HUB_OFFLINE once at import; read the environment now as well."""
    from huggingface_hub import constants

    flags = {os.environ.get(v, "").upper() for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    return constants.is_offline_mode() or bool(flags & {"1", "ON", "YES", "TRUE"})


def _line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


# ----------------------------------------------------------------------------- reading

# What safetensors' numpy framework can return, by the dtype code in the file header.
_SAFETENSORS_DTYPES = {
    "BOOL": np.bool_, "U8": np.uint8, "I8": np.int8, "U16": np.uint16, "I16": np.int16,
    "U32": np.uint32, "I32": np.int32, "U64": np.uint64, "I64": np.int64,
    "F16": np.float16, "BF16": ml_dtypes.bfloat16, "F32": np.float32, "F64": np.float64,
}  # fmt: skip


class _SafetensorsFile:
    """One open .safetensors file; safetensors failures become CheckpointErrors naming it."""

    def __init__(self, path: Path):
        self.path = path
        with self._errors():  # the whole header is parsed and checked against the size here
            self._handle = safetensors.safe_open(str(path), framework="numpy")
            # Whole tensors are read with plain reads, not through safe_open's memory map: mapped
            # pages count in the process's RSS until the file closes, so a one-file checkpoint
            # would sit in memory twice (the map and the parameters) by the end of a load.
            self._file = open(path, "rb", buffering=0)  # noqa: SIM115 (closed by close())
            self._offsets = _safetensors_offsets(self._file)

    @contextmanager
    def _errors(self):
        try:
            yield
        except (safetensors.SafetensorError, OSError) as e:
            raise CheckpointError(f"{self.path}: unreadable or corrupt safetensors ({e})") from e

    def keys(self) -> list[str]:
        return list(self._handle.keys())

    def metadata(self) -> dict[str, str]:
        return self._handle.metadata() or {}

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._handle.get_slice(key).get_shape())

    def dtype(self, key: str) -> np.dtype:
        code = self._handle.get_slice(key).get_dtype()
        if code not in _SAFETENSORS_DTYPES:
            raise CheckpointError(f"{self.path}: tensor {key!r} has unsupported dtype {code}")
        return np.dtype(_SAFETENSORS_DTYPES[code])

    def read(self, key: str) -> np.ndarray:
        dtype = self.dtype(key)  # also refuses the dtypes numpy lacks (F8)
        begin, end = self._offsets[key]
        array = aligned_empty(self.shape(key), dtype)
        if array.nbytes != end - begin:  # safe_open checked this; a changed file would not match
            raise CheckpointError(f"{self.path}: tensor {key!r} has {end - begin} bytes")
        with self._errors():
            read_into(self._file, begin, array, self.path)
        return array

    def read_slice(self, key: str, index: tuple[slice, ...]) -> np.ndarray:
        self.dtype(key)
        with self._errors():
            return self._handle.get_slice(key)[index]

    def close(self) -> None:
        self._handle.__exit__(None, None, None)  # safe_open has no close(); exiting unmaps it
        self._file.close()


def _safetensors_offsets(file) -> dict[str, tuple[int, int]]:
    """Tensor name -> (first byte, end) in the file, from the header safe_open validated."""
    length = int.from_bytes(file.read(8), "little")
    header = json.loads(file.read(length))
    start = 8 + length
    return {
        name: (start + entry["data_offsets"][0], start + entry["data_offsets"][1])
        for name, entry in header.items()
        if name != "__metadata__"
    }


def arrange(array: np.ndarray, axes: tuple[int, ...], dtype) -> np.ndarray:
    """`array.transpose(axes).astype(dtype)` as a C-ordered, 64-byte aligned array, copying at
    most once (not at all when `array` already is that): jax.device_put on CPU then takes the
    buffer as it is, so a tensor is copied once between the file and the device array."""
    moved = np.transpose(array, axes)
    dtype = np.dtype(dtype)
    aligned = moved.ctypes.data % ALIGNMENT == 0
    if moved.dtype == dtype and moved.flags.c_contiguous and aligned:
        return moved
    out = aligned_empty(moved.shape, dtype)
    if moved.ndim == 2 and not moved.flags.c_contiguous:
        # numpy copies a transposed matrix element by element across the cache (~0.6 GB/s);
        # bands of 64 source rows stay in cache (~3 GB/s).
        for i in range(0, moved.shape[1], 64):
            np.copyto(out[:, i : i + 64], moved[:, i : i + 64], casting="unsafe")
    else:
        np.copyto(out, moved, casting="unsafe")  # rounds as astype does
    return out


def _open_weight_file(path: Path, format: str):
    if format == "flax":
        return FlaxMsgpackFile(path)
    if format == "safetensors":
        reader = _SafetensorsFile(path)
        if reader.metadata().get("format") == "flax":  # saved by transformers 4 Flax
            return FlaxSafetensorsFile(reader)
        return reader
    from flaxauto.converters.torch_pickle import open_torch_bin  # only .bin checkpoints need it

    return open_torch_bin(path)


class TensorSource:
    """All tensors of a checkpoint, read one at a time with at most one weight file open."""

    def __init__(self, checkpoint: Checkpoint):
        self.checkpoint = checkpoint
        self._file_of = None if checkpoint.weight_map is None else dict(checkpoint.weight_map)
        self._reader, self._open_path = None, None

    def keys(self) -> list[str]:
        return list(self._files())

    def keys_by_file(self) -> list[list[str]]:
        groups: dict[Path, list[str]] = {path: [] for path in self.checkpoint.weight_files}
        for key, path in self._files().items():
            groups[path].append(key)
        return list(groups.values())

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._reader_for(key).shape(key))

    def dtype(self, key: str) -> np.dtype:
        return np.dtype(self._reader_for(key).dtype(key))

    def read(self, key: str) -> np.ndarray:
        return self._reader_for(key).read(key)

    def read_slice(self, key: str, index: tuple[slice, ...]) -> np.ndarray:
        """`read(key)[index]` with numpy semantics, reading only the block the slices cover."""
        shape, index = self.shape(key), index if isinstance(index, tuple) else (index,)
        block, steps, out_shape = _plan_slices(index, shape)
        if not shape:
            return self.read(key)
        if 0 in out_shape:  # the readers reject empty ranges, and there is nothing to read
            return np.empty(out_shape, self.dtype(key))
        part = self._reader_for(key).read_slice(key, block)
        if all(step.step == 1 for step in steps):
            return part
        return np.ascontiguousarray(part[steps])  # a copy, so the block can be freed

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
        self._reader, self._open_path = None, None

    def __enter__(self) -> TensorSource:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _files(self) -> dict[str, Path]:
        if self._file_of is None:  # a single file: its own header is the only list of keys
            (path,) = self.checkpoint.weight_files
            self._file_of = dict.fromkeys(self._open(path).keys(), path)
        return self._file_of

    def _reader_for(self, key: str):
        if key not in self._files():
            raise KeyError(f"{key!r}: no such tensor in checkpoint {self.checkpoint.directory}")
        return self._open(self._file_of[key])

    def _open(self, path: Path):
        if path != self._open_path:
            self.close()  # done with one file before the next is opened, so memory stays flat
            reader = _open_weight_file(path, self.checkpoint.format)
            if self.checkpoint.weight_map is not None:
                _check_shard(path, reader, self.checkpoint.weight_map)
            self._reader, self._open_path = reader, path
        return self._reader


def open_tensors(checkpoint: Checkpoint) -> TensorSource:
    return TensorSource(checkpoint)


def _check_shard(path: Path, reader, weight_map: dict[str, Path]) -> None:
    """The index is only a promise; check it when the shard is opened, before any read."""
    missing = sorted({k for k, shard in weight_map.items() if shard == path} - set(reader.keys()))
    if missing:
        reader.close()
        shown = ", ".join(map(repr, missing[:10])) + (", ..." if len(missing) > 10 else "")
        raise CheckpointError(
            f"{path}: lacks {len(missing)} tensor(s) the index puts there: {shown}"
        )


def _plan_slices(index: tuple[slice, ...], shape: tuple[int, ...]):
    """Turn numpy slices into one in-bounds, unit-step block per axis plus steps to take within it.

    The readers only take such blocks; numpy semantics (negative or out-of-range bounds, steps)
    are applied here so that every format behaves alike.
    """
    if len(index) > len(shape) or not all(isinstance(s, slice) for s in index):
        raise IndexError(f"expected at most {len(shape)} slices for shape {shape}, got {index!r}")
    index += (slice(None),) * (len(shape) - len(index))
    picked = [range(*s.indices(size)) for s, size in zip(index, shape, strict=True)]
    ends = [sorted((r[0], r[-1])) if r else (0, -1) for r in picked]
    block = tuple(slice(first, last + 1) for first, last in ends)
    # The first and last picked items are the block's ends, so a bare step walks the rest.
    return block, tuple(slice(None, None, r.step) for r in picked), tuple(map(len, picked))


# ----------------------------------------------------------------------------- writing

_UNITS = {"GIB": 2**30, "MIB": 2**20, "KIB": 2**10, "GB": 10**9, "MB": 10**6, "KB": 10**3}


def parse_size(size: int | str) -> int:
    """Bytes in "5GB", "500MB", "10GiB", "100KB"; as in transformers, "5Gb" (small b) means bits."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+)\s*([A-Za-z]+)\s*", str(size))
    unit = match.group(2).upper() if match else ""
    if unit not in _UNITS:
        raise ValueError(f"invalid size {size!r}: use an integer or e.g. '5GB', '500MB', '10GiB'")
    n = int(match.group(1)) * _UNITS[unit]
    return n // 8 if "I" not in unit and match.group(2).endswith("b") else n


def save_safetensors(
    directory,
    tensors: Iterable[tuple[str, np.ndarray]] | Mapping[str, np.ndarray],
    *,
    max_shard_size: int | str = "5GB",
    metadata: dict[str, str] | None = None,
    extra_files: Mapping[str, str | bytes] = MappingProxyType({}),
    replaces: Iterable[str] = (),
) -> list[Path]:
    """Write model.safetensors, or shards plus an index once past `max_shard_size`; all or nothing.

    Tensors are streamed, holding at most one shard in memory. The save is crash-consistent: the
    new checkpoint is built whole in a staging folder beside `directory` (with hard links to the
    files of `directory` it keeps, such as a tokenizer), flushed to disk (fsync), and exchanged
    with `directory` in one atomic rename (see commit_directory). Interrupted anywhere (an error,
    a full disk, a kill), `directory` holds wholly the earlier checkpoint or wholly this one.
    Weight files of an earlier save, and the files named in `replaces` that this save does not
    write (a stale generation_config.json), are not carried over.
    """
    directory, limit = Path(directory).absolute(), parse_size(max_shard_size)
    for name in extra_files:
        if Path(name).name != name or name in {".", ".."} or _is_weight_file(name):
            raise ValueError(f"extra file {name!r}: need a plain file name, not a weight file's")
    directory.parent.mkdir(parents=True, exist_ok=True)
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"{directory}: exists and is not a directory")
    header = {"format": "pt", **(metadata or {})}  # transformers refuses files without a format
    staging = directory.parent / f".{directory.name}.flaxauto-save-{uuid.uuid4().hex[:12]}"
    staging.mkdir()
    try:
        written = _write_weights(staging, _checked(tensors), limit, header)
        written += [_write(staging / name, content) for name, content in extra_files.items()]
        names = [path.name for path in written]
        dropped = {*names, *replaces}
        if directory.is_dir():
            _link_kept_files(
                directory, staging, lambda name: name in dropped or _is_weight_file(name)
            )
        _fsync_directory(staging)
        commit_directory(staging, directory, names, dropped)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # after the exchange: the earlier checkpoint
    return [directory / name for name in names]


def _link_kept_files(directory: Path, staging: Path, replaced: Callable[[str], bool]) -> None:
    """Hard links (copies where the file system has none) in `staging` to every entry of
    `directory` that the new checkpoint does not replace; folders are rebuilt with links inside."""
    for entry in directory.iterdir():
        if replaced(entry.name):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, staging / entry.name, symlinks=True, copy_function=_link)
        else:
            _link(entry, staging / entry.name)


def _link(source, target) -> None:
    if os.path.islink(source):
        os.symlink(os.readlink(source), target)
        return
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def _fsync_directory(directory: Path) -> None:
    """Flush a folder's entries (names) to disk; a file's own data is flushed as it is written."""
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


_AT_FDCWD, _RENAME_EXCHANGE = -100, 2  # from <fcntl.h> and <linux/fs.h>


def exchange_paths(a: Path, b: Path) -> None:
    """Swap two existing paths in one atomic step (Linux renameat2 with RENAME_EXCHANGE).

    Raises OSError(ENOSYS) where the C library lacks renameat2, and whatever the kernel says
    (EINVAL) where the file system cannot exchange."""
    if not sys.platform.startswith("linux"):
        raise OSError(errno.ENOSYS, "renameat2 is Linux-only", str(a))
    libc = ctypes.CDLL(None, use_errno=True)
    function = getattr(libc, "renameat2", None)
    if function is None:
        raise OSError(errno.ENOSYS, "the C library has no renameat2", str(a))
    result = function(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if result != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), str(a), None, str(b))


def commit_directory(staging: Path, directory: Path, names, dropped) -> None:
    """Make the complete checkpoint in `staging` the content of `directory`.

    A new `directory` is one rename. An existing one is exchanged with `staging` in one atomic
    step, so a kill at any instant leaves one whole checkpoint; the earlier content ends in
    `staging`, for the caller to delete. Where that cannot be done (a file system or OS without
    renameat2's exchange, or `directory` is this process's working directory, whose folder must
    stay the same), the files are replaced one by one with an undo log: an error at any step
    (a failing rename, a full disk) restores the earlier checkpoint, but a kill part way can
    leave a mix there (named in the README)."""
    if not directory.exists():
        os.rename(staging, directory)
        _fsync_directory(directory.parent)
        return
    cwd = Path.cwd().resolve()
    if directory.resolve() not in (cwd, *cwd.parents):
        try:
            exchange_paths(staging, directory)
            _fsync_directory(directory.parent)
            return
        except OSError as error:
            if error.errno not in _NO_EXCHANGE:
                raise
    _replace_files_one_by_one(staging, directory, names, dropped)


_NO_EXCHANGE = {errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV}


def _replace_files_one_by_one(staging: Path, directory: Path, names, dropped) -> None:
    """The fallback commit: weights first, then the index and configs, then old files removed;
    every step undone on an error."""
    backup = staging / f".earlier-{uuid.uuid4().hex[:8]}"
    backup.mkdir()
    undo = []
    try:
        for name in names:
            if (directory / name).exists():
                os.link(directory / name, backup / name)  # keep the earlier file to restore
                undo.append((os.replace, backup / name, directory / name))
            else:
                undo.append((os.unlink, directory / name))
            os.replace(staging / name, directory / name)
        for old in list(directory.iterdir()):
            if old.name not in names and (old.name in dropped or _is_weight_file(old.name)):
                os.replace(old, backup / old.name)
                undo.append((os.replace, backup / old.name, old))
        _fsync_directory(directory)
    except BaseException:
        for step, *paths in reversed(undo):
            with contextlib.suppress(OSError):
                step(*paths)
        raise


def _write_weights(directory: Path, items, limit: int, metadata: dict[str, str]) -> list[Path]:
    """Write the shards (and index) under their final names in a fresh folder; return them."""
    paths, shard_of, total_size, total_parameters = [], {}, 0, 0
    # No enumerate(): its cached result tuple would keep the last shard alive while the next fills.
    for shard in _group_into_shards(items, limit):
        paths.append(directory / f".shard-{len(paths) + 1:05d}.safetensors")
        safetensors.numpy.save_file(shard, paths[-1], metadata=metadata)
        _fsync_file(paths[-1])
        shard_of.update(dict.fromkeys(shard, len(paths)))
        total_size += sum(array.nbytes for array in shard.values())
        total_parameters += sum(array.size for array in shard.values())
        del shard  # likewise, or this shard stays alive while the generator gathers the next one
    names = [f"model-{i:05d}-of-{len(paths):05d}.safetensors" for i in range(1, len(paths) + 1)]
    if len(paths) == 1:
        names = [SAFE_WEIGHTS]
    final = [path.with_name(name) for path, name in zip(paths, names, strict=True)]
    for path, target in zip(paths, final, strict=True):  # the count is known only at the end
        os.rename(path, target)
    if len(paths) == 1:
        return final
    index = {  # what transformers writes, byte for byte
        "metadata": {"total_parameters": total_parameters, "total_size": total_size},
        "weight_map": {key: names[number - 1] for key, number in shard_of.items()},
    }
    text = json.dumps(index, indent=2, sort_keys=True) + "\n"
    return [*final, _write(directory / SAFE_INDEX, text)]


def _checked(tensors) -> Iterator[tuple[str, np.ndarray]]:
    seen = set()
    for name, value in tensors.items() if isinstance(tensors, Mapping) else tensors:
        if not isinstance(name, str) or name in seen:
            raise ValueError(f"tensor name {name!r}: names must be unique strings")
        seen.add(name)
        # safetensors writes raw memory, so it needs C order; np.ascontiguousarray makes 0-d 1-d.
        yield name, np.array(value, copy=None, order="C")


def _group_into_shards(items, limit: int) -> Iterator[dict[str, np.ndarray]]:
    """Greedy, in order: a shard closes when the next tensor would push it past `limit` bytes."""
    shard, size = {}, 0
    for name, array in items:
        if shard and size + array.nbytes > limit:
            yield shard
            shard, size = {}, 0
        shard[name] = array
        size += array.nbytes
    yield shard  # always at least one file, even for no tensors


def _write(path: Path, content: str | bytes) -> Path:
    path.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
    _fsync_file(path)
    return path


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as file:
        os.fsync(file.fileno())


def _is_weight_file(name: str) -> bool:
    return name in (SAFE_WEIGHTS, SAFE_INDEX) or _SHARD_NAME.fullmatch(name) is not None
