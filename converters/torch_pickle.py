"""Read PyTorch `pytorch_model.bin` checkpoints without torch: safely, lazily, one tensor at a time.

Since torch 1.6, `torch.save` writes a zip archive: `<prefix>/data.pkl` pickles the state dict,
and every tensor storage is a separate member `<prefix>/data/<key>` holding raw little-endian
bytes. A plain `pickle.load` of data.pkl would run any callable the file names, so data.pkl is
parsed by an unpickler that resolves only the handful of globals a tensor state dict needs, and
resolves them to local stand-ins that record where each tensor lives instead of building it.
Storage bytes are read from the zip only when `read` asks for that tensor.
"""

from __future__ import annotations

import collections
import contextlib
import os
import pickle
import struct
import zipfile
import zlib
from typing import Any, NamedTuple

import ml_dtypes
import numpy as np

from .buffers import aligned_empty, read_into
from .errors import CheckpointError, UnsafeCheckpointError

# Tables are laid out by hand, hence no formatter.
# fmt: off
# torch dtype names (pickled as `torch.<name>`) -> numpy dtypes; numpy and ml_dtypes (bfloat16,
# float8) spell them the same way. Storages are little-endian, so the numpy dtypes say so.
_NUMPY_NAMES = "bool uint8 uint16 uint32 uint64 int8 int16 int32 int64 float16 float32 float64"
_NUMPY_NAMES += " complex64 complex128"
_ML_DTYPES_NAMES = "bfloat16 float8_e4m3fn float8_e4m3fnuz float8_e5m2 float8_e5m2fnuz"
_ML_DTYPES_NAMES += " float8_e8m0fnu"
_DTYPES = {name: np.dtype(name).newbyteorder("<") for name in _NUMPY_NAMES.split()}
_DTYPES |= {n: np.dtype(getattr(ml_dtypes, n)) for n in _ML_DTYPES_NAMES.split() if hasattr(ml_dtypes, n)}

# Typed storage classes (`torch.FloatStorage`, ...), which torch.save still writes for the dtypes
# that have one, -> the torch dtype name they hold.
_STORAGE_DTYPES = {
    "DoubleStorage": "float64", "FloatStorage": "float32", "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16", "ComplexFloatStorage": "complex64",
    "ComplexDoubleStorage": "complex128", "LongStorage": "int64", "IntStorage": "int32",
    "ShortStorage": "int16", "CharStorage": "int8", "ByteStorage": "uint8", "BoolStorage": "bool",
}
# fmt: on


# Stand-ins are NamedTuples: immutable (a hostile BUILD opcode cannot alter the shared table
# entries) and not callable (a hostile REDUCE on them fails instead of doing anything).
class _StorageType(NamedTuple):
    dtype_name: str | None  # None for UntypedStorage, which is sized in bytes


class _TorchDtype(NamedTuple):
    name: str


class _Storage(NamedTuple):
    key: str  # the zip member is <prefix>/data/<key>
    dtype_name: str | None
    nbytes: int


class _TensorRef(NamedTuple):
    storage: _Storage
    dtype: np.dtype
    offset: int  # in elements of `dtype`, like torch's storage_offset
    shape: tuple[int, ...]
    stride: tuple[int, ...]  # in elements


def _tensor_ref(storage, offset, shape, stride, dtype_name=None) -> _TensorRef:
    """Validate the pickled arguments of one tensor, so `read` can trust them."""
    if not isinstance(storage, _Storage):
        raise ValueError(f"a tensor whose storage is a {type(storage).__name__}")
    dtype_name = dtype_name or storage.dtype_name
    if dtype_name not in _DTYPES:
        raise ValueError(f"a tensor of unsupported dtype {dtype_name!r}")
    if not (isinstance(shape, tuple) and isinstance(stride, tuple) and len(shape) == len(stride)):
        raise ValueError(f"bad tensor layout: size={shape!r} stride={stride!r}")
    if not all(type(d) is int and d >= 0 for d in (offset, *shape, *stride)):
        raise ValueError(f"bad tensor layout: offset={offset!r} size={shape!r} stride={stride!r}")
    dtype = _DTYPES[dtype_name]
    if 0 not in shape:  # an empty tensor touches no bytes, whatever its offset
        last = offset + sum((n - 1) * s for n, s in zip(shape, stride, strict=True))
        if (last + 1) * dtype.itemsize > storage.nbytes:
            raise ValueError(f"a tensor reaches past the end of storage {storage.key!r}")
    return _TensorRef(storage, dtype, offset, shape, stride)


# The signatures mirror torch._utils; arguments that only matter to autograd are ignored.
def _rebuild_tensor(storage, storage_offset, size, stride, *requires_grad_hooks_metadata):
    return _tensor_ref(storage, storage_offset, size, stride)


def _rebuild_tensor_v3(storage, offset, size, stride, requires_grad, hooks, dtype, metadata=None):
    # v3 carries the dtype itself: torch uses it for dtypes without a typed storage class
    # (float8, uint16, ...), whose storage is an UntypedStorage of raw bytes.
    if not isinstance(dtype, _TorchDtype):
        raise ValueError(f"{dtype!r} is not a torch dtype")
    return _tensor_ref(storage, offset, size, stride, dtype.name)


def _rebuild_parameter(data, requires_grad, hooks, state=None):
    if not isinstance(data, _TensorRef):
        raise ValueError("a Parameter that does not wrap a tensor")
    return data  # to a state dict reader a Parameter is just its tensor


_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,  # v1 plus autograd arguments
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch.storage", "UntypedStorage"): _StorageType(None),
    ("torch", "UntypedStorage"): _StorageType(None),
    **{("torch", cls): _StorageType(dtype) for cls, dtype in _STORAGE_DTYPES.items()},
    **{("torch", name): _TorchDtype(name) for name in _DTYPES},
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Every global and persistent id passes through here before the pickle can use it."""

    def __init__(self, file, path: str):
        super().__init__(file, encoding="utf-8")
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafeCheckpointError(
                f"{self._path}: refusing to load: data.pkl asks for {module}.{name}, which is not "
                "among the few globals a plain tensor state dict uses; nothing was executed"
            ) from None

    def persistent_load(self, pid: Any) -> _Storage:
        # torch.save writes ('storage', storage class, key, location, numel) for each storage.
        match pid:
            case ("storage", _StorageType() as kind, str() as key, _location, int() as numel):
                if numel >= 0:
                    # A typed storage counts elements; an UntypedStorage counts bytes.
                    itemsize = _DTYPES[kind.dtype_name].itemsize if kind.dtype_name else 1
                    return _Storage(key, kind.dtype_name, numel * itemsize)
        raise UnsafeCheckpointError(
            f"{self._path}: refusing to load: data.pkl holds persistent id {pid!r:.80}, "
            "which is not a tensor storage; nothing was executed"
        )


@contextlib.contextmanager
def _zip_errors(path: str, member: str):
    """Turn the many ways a damaged zip fails into one CheckpointError naming the file."""
    try:
        yield
    except CheckpointError:
        raise
    # zipfile also fails with UnicodeDecodeError (a ValueError) on a damaged name, struct.error
    # and OverflowError on damaged sizes, RuntimeError on a (damaged) encryption flag: fuzzed
    except (
        zipfile.BadZipFile, zlib.error, EOFError, OSError, NotImplementedError, ValueError,
        struct.error, OverflowError, IndexError, RuntimeError,
    ) as exc:  # fmt: skip
        raise CheckpointError(
            f"{path}: cannot read {member}: the file is corrupt or truncated ({exc})"
        ) from exc


def _open_zip(path: str) -> zipfile.ZipFile:
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot open checkpoint ({exc})") from exc
    if magic[:2] != b"PK":
        raise CheckpointError(
            f"{path}: not a zip archive: either not a PyTorch checkpoint at all, or the legacy "
            "(pre-1.6, non-zip) PyTorch format, which flaxauto does not read; re-save it with a "
            "recent torch or convert to safetensors"
        )
    with _zip_errors(path, "the zip directory"):
        return zipfile.ZipFile(path)


def _find_prefix(archive: zipfile.ZipFile, path: str) -> str:
    # torch names the top folder after the file it saved to, so it is found, not assumed.
    found = [n for n in archive.namelist() if n.count("/") == 1 and n.endswith("/data.pkl")]
    if len(found) != 1:
        raise CheckpointError(f"{path}: a zip archive, but not one written by torch.save")
    return found[0].split("/")[0]


def _check_byteorder(archive: zipfile.ZipFile, prefix: str, path: str) -> None:
    member = f"{prefix}/byteorder"
    if member not in archive.NameToInfo:
        return  # older torch wrote no record; its files came from little-endian hosts in practice
    with _zip_errors(path, member):
        order = archive.read(member).strip()
    if order != b"little":
        raise CheckpointError(
            f"{path}: storages are {order.decode(errors='replace')}-endian; flaxauto only reads "
            "little-endian checkpoints"
        )


def _load_tensor_refs(archive: zipfile.ZipFile, prefix: str, path: str) -> dict[str, _TensorRef]:
    member = f"{prefix}/data.pkl"
    try:
        with _zip_errors(path, member), archive.open(member) as f:
            top = _RestrictedUnpickler(f, path).load()
    except CheckpointError:
        raise
    except Exception as exc:  # any malformed pickle, or a bad argument to a stand-in
        raise CheckpointError(f"{path}: data.pkl is not a valid PyTorch pickle ({exc})") from exc
    if not isinstance(top, dict):
        raise CheckpointError(
            f"{path}: not a state dict: the checkpoint holds a {type(top).__name__}, "
            "not a dict of tensors"
        )
    for key, value in top.items():
        if isinstance(value, dict):
            raise CheckpointError(
                f"{path}: not a flat state dict: entry {key!r} is a nested dict; save that "
                "inner dict of tensors on its own and load the result"
            )
        if not isinstance(key, str) or not isinstance(value, _TensorRef):
            raise CheckpointError(
                f"{path}: not a state dict: entry {key!r} is a {type(value).__name__}, not a tensor"
            )
    return dict(top)


class TorchBinReader:
    """Context manager over one pytorch_model.bin file."""

    def __init__(self, path: str | os.PathLike):
        self._path = os.fspath(path)
        self._zip = _open_zip(self._path)
        try:
            self._prefix = _find_prefix(self._zip, self._path)
            _check_byteorder(self._zip, self._prefix, self._path)
            self._tensors = _load_tensor_refs(self._zip, self._prefix, self._path)
        except BaseException:
            self._zip.close()
            raise

    def keys(self) -> list[str]:
        return list(self._tensors)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._ref(key).shape

    def dtype(self, key: str) -> np.dtype:
        return self._ref(key).dtype

    def read(self, key: str) -> np.ndarray:
        """The tensor as a fresh C-contiguous array; reads only its storage from the zip."""
        ref = self._ref(key)
        if 0 in ref.shape:
            return np.empty(ref.shape, ref.dtype)
        buffer = self._read_storage(ref.storage)
        # A strided view straight onto the storage bytes (as_strided would round-trip through
        # __array_interface__, which loses ml_dtypes' float8 types).
        itemsize = ref.dtype.itemsize
        strides = tuple(s * itemsize for s in ref.stride)
        view = np.ndarray(ref.shape, ref.dtype, buffer, ref.offset * itemsize, strides)
        if view.nbytes == len(buffer) and view.flags.c_contiguous:
            return view  # the whole storage, in order: its freshly read buffer is the array
        return np.array(view, order="C")  # part of a shared or larger storage: copy it out

    def read_slice(self, key: str, index: tuple[slice, ...]) -> np.ndarray:
        return np.array(self.read(key)[index], order="C")

    def close(self) -> None:
        self._zip.close()

    def __enter__(self) -> TorchBinReader:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _ref(self, key: str) -> _TensorRef:
        try:
            return self._tensors[key]
        except KeyError:
            raise KeyError(f"{self._path}: no tensor named {key!r}") from None

    def _read_storage(self, storage: _Storage) -> np.ndarray:
        member = f"{self._prefix}/data/{storage.key}"
        info = self._zip.NameToInfo.get(member)
        if info is None or info.file_size != storage.nbytes:
            found = "missing" if info is None else f"{info.file_size} bytes"
            raise CheckpointError(
                f"{self._path}: storage {member} should hold {storage.nbytes} bytes but is "
                f"{found}; the checkpoint is truncated or corrupt"
            )
        # Writable, so a whole-storage tensor needs no copy; aligned, so that jax.device_put on
        # CPU can adopt it as it is.
        buffer = aligned_empty((storage.nbytes,), np.uint8)
        if info.compress_type == zipfile.ZIP_STORED and not info.flag_bits & 0x1:
            with _zip_errors(self._path, member):
                self._read_stored(info, buffer, member)
            return buffer
        with _zip_errors(self._path, member), self._zip.open(info) as f:
            got = f.readinto(buffer)
            # Reading on to the end makes zipfile verify the member's CRC.
            if got != storage.nbytes or f.read(1):
                raise CheckpointError(f"{self._path}: storage {member} is truncated or corrupt")
        return buffer

    def _read_stored(self, info: zipfile.ZipInfo, buffer: np.ndarray, member: str) -> None:
        """An uncompressed member (what torch.save writes), read straight into `buffer` (zipfile
        reads into a bytes object, then copies) and CRC-checked as zipfile would."""
        archive = self._zip.fp
        archive.seek(info.header_offset)
        header = archive.read(30)  # the member's local header; its name and extra field follow
        if len(header) != 30 or header[:4] != b"PK\x03\x04":
            raise CheckpointError(f"{self._path}: bad local header for {member}; corrupt file")
        name_length, extra_length = struct.unpack("<HH", header[26:30])
        read_into(archive, info.header_offset + 30 + name_length + extra_length, buffer, self._path)
        if zlib.crc32(buffer) != info.CRC:
            raise CheckpointError(f"{self._path}: storage {member} fails its CRC; corrupt file")


def open_torch_bin(path: str | os.PathLike) -> TorchBinReader:
    """Open a zip-format PyTorch checkpoint (torch.save, torch >= 1.6) for lazy, torch-free reads."""
    return TorchBinReader(path)
