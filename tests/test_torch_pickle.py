"""The torch-free pytorch_model.bin reader against real torch.save output, and against attacks."""

import io
import os
import pickle
import subprocess
import zipfile
from collections import OrderedDict

import ml_dtypes
import numpy as np
import pytest
import torch

from flaxauto.converters.errors import CheckpointError, UnsafeCheckpointError
from flaxauto.converters.torch_pickle import TorchBinReader, open_torch_bin


def _torch_bytes(t: torch.Tensor) -> bytes:
    """The tensor's values as raw bytes in C order: a bit-exact reference for every dtype."""
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _assert_same(array: np.ndarray, t: torch.Tensor) -> None:
    assert array.shape == tuple(t.shape)
    assert array.flags.c_contiguous and array.flags.writeable
    assert array.tobytes() == _torch_bytes(t)


def _rewrite_member(src, dst, suffix: str, data: bytes) -> None:
    """Copy a checkpoint zip, replacing the member whose name ends with `suffix`."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            body = data if info.filename.endswith(suffix) else zin.read(info)
            zout.writestr(info.filename, body)


def _save(tmp_path, obj, name="model.bin", **kwargs):
    path = tmp_path / name
    torch.save(obj, path, **kwargs)
    return path


DTYPES = {
    torch.float16: np.float16,
    torch.float32: np.float32,
    torch.float64: np.float64,
    torch.bfloat16: ml_dtypes.bfloat16,
    torch.int8: np.int8,
    torch.int16: np.int16,
    torch.int32: np.int32,
    torch.int64: np.int64,
    torch.uint8: np.uint8,
    torch.bool: np.bool_,
    torch.float8_e4m3fn: ml_dtypes.float8_e4m3fn,
    torch.float8_e5m2: ml_dtypes.float8_e5m2,
}


@pytest.mark.parametrize("torch_dtype", list(DTYPES), ids=str)
def test_round_trip_every_dtype(tmp_path, torch_dtype):
    values = torch.randn(5, 7, generator=torch.Generator().manual_seed(0)) * 50
    if not torch_dtype.is_floating_point:  # keep integers in range of every integer dtype
        values = values.clamp(0 if torch_dtype == torch.uint8 else -100, 100)
    t = values > 0 if torch_dtype == torch.bool else values.to(torch_dtype)
    path = _save(tmp_path, {"w": t, "t": t.t(), "scalar": t[1, 2].clone(), "empty": t[:0]})
    with open_torch_bin(path) as reader:
        assert reader.keys() == ["w", "t", "scalar", "empty"]
        for key, expected in [("w", t), ("t", t.t()), ("scalar", t[1, 2]), ("empty", t[:0])]:
            assert reader.dtype(key) == np.dtype(DTYPES[torch_dtype])
            assert reader.shape(key) == tuple(expected.shape)
            _assert_same(reader.read(key), expected)
        if torch_dtype == torch.bfloat16:  # also by value, through float32
            np.testing.assert_array_equal(reader.read("w").astype(np.float32), t.float().numpy())


def test_shared_storages_and_non_contiguous_views(tmp_path):
    base = torch.arange(60, dtype=torch.float32).reshape(6, 10)
    views = OrderedDict(
        base=base,
        transposed=base.t(),
        sliced=base[1:5, 2::3],
        sliced_transposed=base[2:, 1:4].t(),
        row=base[3],
        element=base[4, 7],  # 0-d with a storage offset
        empty=base[2:2],
        own=torch.tensor(2.5),
        empty_own=torch.zeros(0, 4, dtype=torch.int64),
    )
    path = _save(tmp_path, views)
    with zipfile.ZipFile(path) as archive:  # the views really share one storage member
        assert sum("/data/" in n for n in archive.namelist()) == 3
    with open_torch_bin(path) as reader:
        assert reader.keys() == list(views)
        for key, expected in views.items():
            _assert_same(reader.read(key), expected)
        first, second = reader.read("transposed"), reader.read("transposed")
        assert not np.shares_memory(first, second)  # each read is a fresh array
        sliced = reader.read_slice("base", (slice(1, 3), slice(None, None, 2)))
        _assert_same(sliced, base[1:3, ::2])


def test_parameters_and_uint16(tmp_path):
    weights = {
        "p": torch.nn.Parameter(torch.ones(3)),
        "u": torch.tensor([0, 1, 300, 65535], dtype=torch.uint16),
    }
    path = _save(tmp_path, weights)
    with open_torch_bin(path) as reader:
        _assert_same(reader.read("p"), weights["p"].detach())
        _assert_same(reader.read("u"), weights["u"])


def test_real_transformers_state_dict(tmp_path):
    from references import torch_model

    state = torch_model("bert", "base").state_dict()
    # transformers 5 always writes safetensors from save_pretrained, so torch.save directly.
    path = _save(tmp_path, state, name="pytorch_model.bin")
    with open_torch_bin(path) as reader:
        assert reader.keys() == list(state)
        for key, expected in state.items():
            assert reader.dtype(key) == np.float32
            _assert_same(reader.read(key), expected)


class _RunsShell:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_reduce_payload_is_refused_before_running(tmp_path):
    marker = tmp_path / "pwned"
    path = _save(tmp_path, OrderedDict(evil=_RunsShell(marker), w=torch.ones(2)))
    with pytest.raises(UnsafeCheckpointError, match=rf"{os.name}\.system") as caught:
        open_torch_bin(path)
    assert str(path) in str(caught.value)
    assert not marker.exists()
    # Control: the payload is live, a naive pickle.load runs it (then fails on the storage id).
    with zipfile.ZipFile(path) as archive:
        data_pkl = archive.read("model/data.pkl")
    with pytest.raises(pickle.UnpicklingError):
        pickle.loads(data_pkl)
    assert marker.exists()


class _Payload:
    def __init__(self, call, args):
        self.call, self.args = call, args

    def __reduce__(self):
        return (self.call, self.args)


@pytest.mark.parametrize("protocol", [2, 4])  # GLOBAL and STACK_GLOBAL opcodes
@pytest.mark.parametrize(
    ("call", "qualified"),
    [(subprocess.Popen, "subprocess.Popen"), (exec, "builtins.exec"), (eval, "builtins.eval")],
)
def test_global_payload_hidden_in_values_is_refused(tmp_path, protocol, call, qualified):
    marker = tmp_path / "pwned"
    args = (
        (["touch", str(marker)],) if call is subprocess.Popen else (f"open({str(marker)!r}, 'w')",)
    )
    # fix_imports=False keeps Python 3 module names (protocol 2 would write __builtin__, commands).
    payload = {"w": {"nested": [1, _Payload(call, args)]}}
    hostile = pickle.dumps(payload, protocol=protocol, fix_imports=False)
    good = _save(tmp_path, {"w": torch.ones(2)})
    path = tmp_path / "hostile.bin"
    _rewrite_member(good, path, "/data.pkl", hostile)
    with pytest.raises(UnsafeCheckpointError, match=qualified) as caught:
        open_torch_bin(path)
    assert str(path) in str(caught.value)
    assert not marker.exists()


def test_foreign_persistent_id_is_refused(tmp_path):
    class _Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            return ("file", "/etc/passwd") if obj == "secret" else None

    body = io.BytesIO()
    _Pickler(body, protocol=2).dump({"w": "secret"})
    path = tmp_path / "pid.bin"
    _rewrite_member(_save(tmp_path, {"w": torch.ones(1)}), path, "/data.pkl", body.getvalue())
    with pytest.raises(UnsafeCheckpointError, match="persistent id"):
        open_torch_bin(path)


@pytest.mark.parametrize(
    "body",
    [
        b"\x80\x02ctorch\nFloatStorage\n)R.",  # call a stand-in
        b"\x80\x02ctorch\nFloatStorage\n}X\x01\x00\x00\x00aK\x01sb.",  # BUILD into one
        b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n(K\x00K\x00)))NtR.",  # no storage
        b"\x80\x02}X\x01\x00\x00\x00w",  # cut short
    ],
)
def test_abusing_the_stand_ins_fails_cleanly(tmp_path, body):
    path = tmp_path / "odd.bin"
    _rewrite_member(_save(tmp_path, {"w": torch.ones(1)}), path, "/data.pkl", body)
    assert "data.pkl" in _error(path)


def _error(path) -> str:
    with pytest.raises(CheckpointError) as caught, open_torch_bin(path) as reader:
        for key in reader.keys():  # noqa: SIM118 (a reader, not a dict)
            reader.read(key)
    message = str(caught.value)
    assert str(path) in message
    return message


def test_truncated_storage(tmp_path):
    good = _save(tmp_path, {"w": torch.ones(4, 4), "v": torch.zeros(3)})
    path = tmp_path / "truncated.bin"
    _rewrite_member(good, path, "/data/0", b"\0" * 10)
    with open_torch_bin(path) as reader:  # the index still opens; only that tensor fails
        assert reader.shape("w") == (4, 4)
        _assert_same(reader.read("v"), torch.zeros(3))
    assert "truncated" in _error(path)


def test_corrupt_storage_bytes_fail_the_crc(tmp_path):
    path = _save(tmp_path, {"w": torch.arange(256, dtype=torch.uint8)})
    raw = bytearray(path.read_bytes())
    raw[raw.index(bytes(range(200, 216)))] ^= 0xFF  # flip one byte inside the storage
    path.write_bytes(bytes(raw))
    assert "corrupt" in _error(path)


def test_truncated_zip(tmp_path):
    path = _save(tmp_path, {"w": torch.ones(100)})
    path.write_bytes(path.read_bytes()[:300])
    assert "corrupt or truncated" in _error(path)


def test_legacy_and_non_zip_files(tmp_path):
    legacy = _save(tmp_path, {"w": torch.ones(2)}, _use_new_zipfile_serialization=False)
    assert "legacy (pre-1.6, non-zip) PyTorch format" in _error(legacy)
    text = tmp_path / "notes.bin"
    text.write_text("hello")
    assert "not a zip archive" in _error(text)
    assert "cannot open" in _error(tmp_path / "missing.bin")


def test_big_endian_is_refused(tmp_path):
    path = tmp_path / "big.bin"
    _rewrite_member(_save(tmp_path, {"w": torch.ones(2)}), path, "/byteorder", b"big")
    assert "big-endian" in _error(path)


@pytest.mark.parametrize(
    ("obj", "expected"),
    [
        ([torch.ones(1)], "not a state dict"),
        ({"state_dict": {"w": torch.ones(1)}}, "nested dict"),
        ({"w": torch.ones(1), "epoch": 3}, "'epoch' is a int, not a tensor"),
    ],
)
def test_not_a_state_dict(tmp_path, obj, expected):
    assert expected in _error(_save(tmp_path, obj))


def test_index_reads_no_storage_and_read_reads_one_member(tmp_path, monkeypatch):
    path = _save(tmp_path, {"a": torch.ones(1000), "b": torch.zeros(10), "c": torch.ones(3)})
    opened = []
    real_open = zipfile.ZipFile.open

    def spy(self, name, *args, **kwargs):
        opened.append(name if isinstance(name, str) else name.filename)
        return real_open(self, name, *args, **kwargs)

    monkeypatch.setattr(zipfile.ZipFile, "open", spy)
    real_stored = TorchBinReader._read_stored  # uncompressed members bypass ZipFile.open

    def stored_spy(self, info, buffer, member):
        opened.append(member)
        return real_stored(self, info, buffer, member)

    monkeypatch.setattr(TorchBinReader, "_read_stored", stored_spy)
    with open_torch_bin(path) as reader:
        assert [reader.shape(k) for k in reader.keys()]  # noqa: SIM118 == [(1000,), (10,), (3,)]
        assert reader.dtype("a") == np.float32
        assert not any("/data/" in name for name in opened)
        opened.clear()
        reader.read("b")
        assert opened == ["model/data/1"]
