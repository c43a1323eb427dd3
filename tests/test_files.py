"""Checkpoint file layer: finding checkpoints (local and Hub cache), reading tensors, atomic saves."""

import hashlib
import json
import os
import weakref

import ml_dtypes
import numpy as np
import pytest
import safetensors
import safetensors.numpy

from flaxauto.converters.errors import CheckpointError
from flaxauto.converters.files import (
    BIN_INDEX,
    BIN_WEIGHTS,
    SAFE_INDEX,
    SAFE_WEIGHTS,
    open_tensors,
    parse_size,
    resolve_checkpoint,
    save_safetensors,
)

CONFIG_TEXT = '{"model_type": "test"}'


def _tensors(seed: int = 0) -> dict[str, np.ndarray]:
    """One tensor of every kind a checkpoint holds, with values that catch any lossy conversion."""
    rng = np.random.default_rng(seed)
    return {
        "embed.weight": rng.standard_normal((7, 5)).astype(np.float32),
        "layer.0.bf16": rng.standard_normal((4, 6)).astype(ml_dtypes.bfloat16),
        "layer.0.f16": rng.standard_normal((3, 2, 4)).astype(np.float16),
        "layer.1.ids": rng.integers(-(2**62), 2**62, size=(9,), dtype=np.int64),
        "layer.1.mask": rng.random(5) > 0.5,
        "scalar": np.array(2.5, dtype=np.float64),
        "empty": np.zeros((0, 3), np.float32),
        "transposed": np.arange(12, dtype=np.int32).reshape(3, 4).T,  # not C-contiguous
    }


def _assert_same(got: np.ndarray, want: np.ndarray) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    assert got.tobytes() == np.ascontiguousarray(want).tobytes()


def _save(directory, tensors, **kwargs):
    return save_safetensors(directory, tensors, extra_files={"config.json": CONFIG_TEXT}, **kwargs)


def _contents(directory) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


# ----------------------------------------------------------------------------- round trips


def test_single_file_round_trip_is_bit_exact(tmp_path):
    tensors = _tensors()
    written = _save(tmp_path, tensors)
    assert written == [tmp_path / SAFE_WEIGHTS, tmp_path / "config.json"]
    assert (tmp_path / "config.json").read_text() == CONFIG_TEXT

    checkpoint = resolve_checkpoint(tmp_path)
    assert checkpoint.format == "safetensors" and checkpoint.weight_map is None
    assert checkpoint.weight_files == (tmp_path / SAFE_WEIGHTS,)
    assert checkpoint.config_path == tmp_path / "config.json"
    assert checkpoint.generation_config_path is None
    with open_tensors(checkpoint) as source:
        assert sorted(source.keys()) == sorted(tensors)  # safetensors lists keys sorted
        assert [sorted(group) for group in source.keys_by_file()] == [sorted(tensors)]
        for key, want in tensors.items():
            assert source.shape(key) == want.shape
            assert source.dtype(key) == want.dtype
            _assert_same(source.read(key), want)
    assert source.dtype("layer.0.bf16") == ml_dtypes.bfloat16


def test_sharded_round_trip_and_transformers_index_format(tmp_path):
    tensors = _tensors()
    (tmp_path / "generation_config.json").write_text("{}")
    # 100 bytes: the 140-byte embedding fills shard 1; the 48-byte bf16 and 48-byte f16 share 2.
    written = _save(tmp_path, iter(tensors.items()), max_shard_size=100)
    shard_names = [p.name for p in written if p.name.startswith("model-")]
    assert len(shard_names) >= 3
    assert shard_names == [f"model-{i:05d}-of-{len(shard_names):05d}.safetensors" for i in range(1, len(shard_names) + 1)]  # fmt: skip
    assert [p.name for p in written[len(shard_names) :]] == [SAFE_INDEX, "config.json"]
    assert not (tmp_path / SAFE_WEIGHTS).exists()

    index_text = (tmp_path / SAFE_INDEX).read_text()
    index = json.loads(index_text)
    assert index_text == json.dumps(index, indent=2, sort_keys=True) + "\n"
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in tensors.values())
    assert index["metadata"]["total_parameters"] == sum(t.size for t in tensors.values())
    assert set(index["weight_map"]) == set(tensors)
    assert index["weight_map"]["embed.weight"] == shard_names[0]
    with safetensors.safe_open(tmp_path / shard_names[0], framework="numpy") as f:
        assert f.metadata() == {"format": "pt"}

    checkpoint = resolve_checkpoint(tmp_path)
    assert checkpoint.weight_files == tuple(tmp_path / name for name in shard_names)
    assert checkpoint.generation_config_path == tmp_path / "generation_config.json"
    with open_tensors(checkpoint) as source:
        by_file = source.keys_by_file()
        # Greedy, in order: shard by shard, the keys come in the order they were given.
        assert sorted(by_file, key=lambda g: list(tensors).index(g[0])) == by_file
        assert sorted(k for group in by_file for k in group) == sorted(tensors)
        for path, group in zip(checkpoint.weight_files, by_file, strict=True):
            with safetensors.safe_open(path, framework="numpy") as f:
                assert sorted(f.keys()) == sorted(group)
        for key in reversed(list(tensors)):
            _assert_same(source.read(key), tensors[key])


def test_a_tensor_bigger_than_the_limit_gets_its_own_shard(tmp_path):
    tensors = {"a": np.zeros(10, np.uint8), "big": np.zeros(100, np.uint8), "b": np.zeros(10, np.uint8)}  # fmt: skip
    _save(tmp_path, tensors, max_shard_size=50)
    with open_tensors(resolve_checkpoint(tmp_path)) as source:
        assert source.keys_by_file() == [["a"], ["big"], ["b"]]


def test_metadata_is_merged_with_the_pt_format(tmp_path):
    save_safetensors(tmp_path, {"x": np.ones(2, np.float32)}, metadata={"note": "hi"})
    with safetensors.safe_open(tmp_path / SAFE_WEIGHTS, framework="numpy") as f:
        assert f.metadata() == {"format": "pt", "note": "hi"}


@pytest.mark.parametrize(
    "index",
    [(), (slice(1, 3),), (slice(None), slice(2, None)), (slice(-2, None), slice(None, -1)),
     (slice(None, None, 2),), (slice(None, None, -1), slice(1, 5, 3)), (slice(3, 1), slice(None)),
     (slice(-100, 100), slice(4, 100)), (slice(5, 6), slice(0, 1))],
)  # fmt: skip
@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
def test_read_slice_matches_numpy(tmp_path, index, dtype):
    array = np.arange(42, dtype=np.float32).reshape(7, 6).astype(dtype)
    _save(tmp_path, {"a": array, "s": np.array(3, np.int8)})
    with open_tensors(resolve_checkpoint(tmp_path)) as source:
        _assert_same(source.read_slice("a", index), array[index])
        _assert_same(source.read_slice("s", ()), np.array(3, np.int8))
        _assert_same(source.read_slice("a", slice(2, 4)), array[2:4])  # a bare slice is fine too
        with pytest.raises(IndexError):
            source.read_slice("a", (slice(None),) * 3)


def test_dtypes_numpy_cannot_hold_are_a_clear_error(tmp_path):
    safetensors.numpy.save_file(
        {"f8": np.ones(3, ml_dtypes.float8_e4m3fn)}, tmp_path / SAFE_WEIGHTS
    )
    (tmp_path / "config.json").write_text(CONFIG_TEXT)
    with open_tensors(resolve_checkpoint(tmp_path)) as source:
        for read in (source.dtype, source.read, lambda key: source.read_slice(key, (slice(1),))):
            with pytest.raises(CheckpointError, match="'f8' has unsupported dtype F8_E4M3"):
                read("f8")


def test_unknown_key_is_a_key_error_naming_the_checkpoint(tmp_path):
    _save(tmp_path, {"x": np.ones(2, np.float32)})
    with (
        open_tensors(resolve_checkpoint(tmp_path)) as source,
        pytest.raises(KeyError, match="nope"),
    ):
        source.read("nope")


def test_transformers_loads_what_we_save_and_we_read_what_it_saves(tmp_path):
    import torch
    import transformers

    from references import torch_model

    model = torch_model("bert", "base")
    config = model.config
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}

    ours = tmp_path / "ours"
    written = _save(ours, state, max_shard_size="20KB")
    (ours / "config.json").write_text(config.to_json_string())
    assert (ours / SAFE_INDEX) in written
    loaded, info = transformers.BertModel.from_pretrained(ours, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, model.state_dict()[key]), key

    theirs = tmp_path / "theirs"
    model.save_pretrained(theirs, max_shard_size="20KB")
    checkpoint = resolve_checkpoint(theirs)
    assert checkpoint.weight_map is not None and len(checkpoint.weight_files) > 1
    with open_tensors(checkpoint) as source:
        assert sorted(source.keys()) == sorted(state)
        for key in source.keys():
            _assert_same(source.read(key), state[key])


# ----------------------------------------------------------------------------- memory behaviour


class _SafeOpenSpy:
    """Wraps safetensors.safe_open to count how many files are open at once."""

    def __init__(self, monkeypatch):
        self.real, self.now, self.most, self.opened = safetensors.safe_open, 0, 0, []
        monkeypatch.setattr(safetensors, "safe_open", self)

    def __call__(self, path, framework):
        handle = self.real(path, framework=framework)
        self.now += 1
        self.most = max(self.most, self.now)
        self.opened.append(os.path.basename(path))
        spy = self

        class Handle:
            def __getattr__(self, name):
                return getattr(handle, name)

            def __exit__(self, *exc):
                spy.now -= 1
                return handle.__exit__(*exc)

        return Handle()


def test_at_most_one_weight_file_is_open_at_a_time(tmp_path, monkeypatch):
    tensors = {f"t{i}": np.full(10, i, np.float32) for i in range(6)}
    _save(tmp_path, tensors, max_shard_size=80)  # two tensors per shard
    spy = _SafeOpenSpy(monkeypatch)
    with open_tensors(resolve_checkpoint(tmp_path)) as source:
        assert spy.opened == []  # nothing is opened before it is needed
        for group in source.keys_by_file():
            for key in group:
                _assert_same(source.read(key), tensors[key])
        assert spy.opened == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
        for key in ["t0", "t5", "t2", "t4"]:  # jumping between shards reopens, never stacks
            source.read_slice(key, (slice(1, 3),))
        assert spy.most == 1 and spy.now == 1
    assert spy.now == 0


def test_save_holds_at_most_one_shard_of_tensors(tmp_path):
    alive = []  # weak references to every tensor handed to the writer so far
    most_alive = 0

    def produce():
        nonlocal most_alive
        for i in range(10):
            most_alive = max(most_alive, sum(ref() is not None for ref in alive))
            array = np.full(100, i, np.float32)  # 400 bytes; two fit in a shard
            alive.append(weakref.ref(array))
            yield f"t{i}", array
            del array

    written = save_safetensors(tmp_path, produce(), max_shard_size=800)
    assert len(written) == 6  # five shards and the index
    assert most_alive <= 2


# ----------------------------------------------------------------------------- atomic saves


def test_failed_save_leaves_the_earlier_checkpoint_untouched(tmp_path):
    _save(tmp_path, _tensors(), max_shard_size=100)
    (tmp_path / "README.md").write_text("keep me")
    before = _contents(tmp_path)

    def failing():
        for i in range(10):
            if i == 6:
                raise RuntimeError("boom half way")
            yield f"new{i}", np.full(50, i, np.float32)  # 200 bytes: a shard each

    with pytest.raises(RuntimeError, match="boom half way"):
        _save(tmp_path, failing(), max_shard_size=100)
    assert _contents(tmp_path) == before  # no temporary files left either


def test_resaving_removes_weights_the_new_save_does_not_use(tmp_path):
    (tmp_path / "README.md").write_text("not ours")
    _save(tmp_path, _tensors(), max_shard_size=100)
    _save(tmp_path, {"x": np.ones(3, np.float32)})
    assert sorted(_contents(tmp_path)) == ["README.md", "config.json", SAFE_WEIGHTS]

    _save(
        tmp_path, {"x": np.ones(30, np.float32), "y": np.ones(30, np.float32)}, max_shard_size=100
    )
    assert sorted(_contents(tmp_path)) == [
        "README.md", "config.json", "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors", SAFE_INDEX,
    ]  # fmt: skip
    with open_tensors(resolve_checkpoint(tmp_path)) as source:
        assert source.keys() == ["x", "y"]


def test_save_rejects_bad_names_before_writing_anything(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(ValueError, match="twice|unique"):
        save_safetensors(target, [("a", np.ones(1)), ("a", np.ones(1))])
    assert not target.exists() or not list(target.iterdir())
    for bad in ["../config.json", SAFE_WEIGHTS, "model-00001-of-00002.safetensors"]:
        with pytest.raises(ValueError, match="extra file"):
            save_safetensors(target, {"a": np.ones(1)}, extra_files={bad: "{}"})


def test_save_creates_the_directory_and_writes_bytes_extra_files(tmp_path):
    target = tmp_path / "a" / "b"
    written = save_safetensors(target, {}, extra_files={"tokenizer.bin": b"\x00\xff"})
    assert written == [target / SAFE_WEIGHTS, target / "tokenizer.bin"]
    assert (target / "tokenizer.bin").read_bytes() == b"\x00\xff"


# ----------------------------------------------------------------------------- bad checkpoints


@pytest.mark.parametrize("name", ["./no-such-checkpoint", "../no-such-checkpoint", "~/no-such-checkpoint-xyz"])  # fmt: skip
def test_missing_local_directory(name):
    with pytest.raises(CheckpointError, match="no such directory"):
        resolve_checkpoint(name)


def test_missing_absolute_directory_and_a_file_instead_of_a_directory(tmp_path):
    with pytest.raises(CheckpointError, match=f"{tmp_path / 'missing'}: no such directory"):
        resolve_checkpoint(str(tmp_path / "missing"))
    (tmp_path / "file.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="no such directory"):
        resolve_checkpoint(tmp_path / "file.safetensors")


def test_directory_without_weights_lists_what_was_looked_for(tmp_path):
    (tmp_path / "config.json").write_text(CONFIG_TEXT)
    with pytest.raises(CheckpointError) as error:
        resolve_checkpoint(tmp_path)
    for name in (SAFE_WEIGHTS, SAFE_INDEX, BIN_WEIGHTS, BIN_INDEX):
        assert name in str(error.value)
    assert str(tmp_path) in str(error.value)


def test_directory_without_config(tmp_path):
    save_safetensors(tmp_path, {"x": np.ones(2, np.float32)})
    with pytest.raises(CheckpointError, match=f"{tmp_path}: no config.json"):
        resolve_checkpoint(tmp_path)


@pytest.mark.parametrize(
    "damage",
    [lambda data: data[:-7], lambda data: data[:20], lambda data: b"\x10" + b"\x00" * 7 + b"garbage!" * 2, lambda data: b""],
    ids=["truncated-data", "truncated-header", "garbage-header", "empty"],
)  # fmt: skip
def test_corrupt_safetensors_names_the_file(tmp_path, damage):
    _save(tmp_path, _tensors())
    path = tmp_path / SAFE_WEIGHTS
    path.write_bytes(damage(path.read_bytes()))
    source = open_tensors(resolve_checkpoint(tmp_path))
    with pytest.raises(CheckpointError, match=f"{path}: unreadable or corrupt safetensors"):
        source.keys()


def test_corrupt_shard_is_reported_when_it_is_opened(tmp_path):
    _save(tmp_path, _tensors(), max_shard_size=100)
    shard = tmp_path / "model-00002-of-00004.safetensors"
    shard.write_bytes(shard.read_bytes()[:-3])
    with open_tensors(resolve_checkpoint(tmp_path)) as source:
        _assert_same(source.read("embed.weight"), _tensors()["embed.weight"])
        with pytest.raises(CheckpointError, match=str(shard)):
            source.read("layer.0.bf16")


@pytest.mark.parametrize(
    ("text", "problem"),
    [("{not json", "not a readable JSON index"), ("[1, 2]", "weight_map"),
     ('{"weight_map": ["a"]}', "weight_map"), ('{"metadata": {}}', "weight_map")],
)  # fmt: skip
def test_corrupt_index(tmp_path, text, problem):
    _save(tmp_path, _tensors(), max_shard_size=100)
    (tmp_path / SAFE_INDEX).write_text(text)
    with pytest.raises(CheckpointError, match=f"{tmp_path / SAFE_INDEX}: .*{problem}"):
        resolve_checkpoint(tmp_path)


def test_index_lists_every_missing_shard_and_bad_entry(tmp_path):
    _save(tmp_path, _tensors(), max_shard_size=100)
    index = json.loads((tmp_path / SAFE_INDEX).read_text())
    index["weight_map"].update({"ghost.a": "gone-1.safetensors", "ghost.b": "gone-2.safetensors", "bad": 3})  # fmt: skip
    (tmp_path / SAFE_INDEX).write_text(json.dumps(index))
    with pytest.raises(CheckpointError) as error:
        resolve_checkpoint(tmp_path)
    message = str(error.value)
    assert str(tmp_path / SAFE_INDEX) in message
    assert "'gone-1.safetensors' is missing" in message
    assert "'gone-2.safetensors' is missing" in message
    assert "'bad' maps to 3" in message


def test_shard_lacking_a_key_the_index_assigns_to_it(tmp_path):
    _save(tmp_path, _tensors(), max_shard_size=100)
    index = json.loads((tmp_path / SAFE_INDEX).read_text())
    index["weight_map"]["ghost"] = "model-00001-of-00004.safetensors"
    (tmp_path / SAFE_INDEX).write_text(json.dumps(index))
    with open_tensors(resolve_checkpoint(tmp_path)) as source:
        assert "ghost" in source.keys()
        _assert_same(source.read("layer.0.bf16"), _tensors()["layer.0.bf16"])  # shard 2 is fine
        with pytest.raises(CheckpointError, match=r"model-00001-of-00004.safetensors: .*'ghost'"):
            source.read("embed.weight")


# ----------------------------------------------------------------------------- parse_size


def test_parse_size_matches_transformers():
    from transformers.utils.hub import convert_file_size_to_int

    for size in [
        "5GB",
        "500MB",
        "10GiB",
        "100KB",
        "1MiB",
        "3KiB",
        "5Gb",
        "8mb",
        "7kb",
        "2gib",
        12345,
    ]:
        assert parse_size(size) == convert_file_size_to_int(size), size
    assert parse_size("5GB") == 5 * 10**9 and parse_size("10GiB") == 10 * 2**30
    for bad in ["5XB", "GB", "", "1.5GB", "-1GB"]:
        with pytest.raises(ValueError, match="invalid size"):
            parse_size(bad)


# ----------------------------------------------------------------------------- pytorch_model.bin


def test_bin_checkpoints_single_and_sharded_and_safetensors_preferred(tmp_path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("flaxauto.converters.torch_pickle")
    state = {
        "a": torch.randn(4, 3),
        "b": torch.randn(2, 5).to(torch.bfloat16),
        "c": torch.arange(6, dtype=torch.int64).reshape(2, 3),
    }
    want = {k: v.view(torch.int16).numpy().view(ml_dtypes.bfloat16) if v.dtype == torch.bfloat16 else v.numpy() for k, v in state.items()}  # fmt: skip

    single = tmp_path / "single"
    single.mkdir()
    (single / "config.json").write_text(CONFIG_TEXT)
    torch.save(state, single / BIN_WEIGHTS)
    checkpoint = resolve_checkpoint(single)
    assert checkpoint.format == "bin" and checkpoint.weight_files == (single / BIN_WEIGHTS,)
    with open_tensors(checkpoint) as source:
        assert source.keys() == list(state) and source.dtype("b") == ml_dtypes.bfloat16
        for key in state:
            _assert_same(source.read(key), want[key])
        _assert_same(source.read_slice("a", (slice(-2, None), slice(None, None, 2))), want["a"][-2:, ::2])  # fmt: skip

    sharded = tmp_path / "sharded"
    sharded.mkdir()
    (sharded / "config.json").write_text(CONFIG_TEXT)
    torch.save({"a": state["a"]}, sharded / "pytorch_model-00001-of-00002.bin")
    torch.save({"b": state["b"], "c": state["c"]}, sharded / "pytorch_model-00002-of-00002.bin")
    weight_map = {"a": "pytorch_model-00001-of-00002.bin", "b": "pytorch_model-00002-of-00002.bin", "c": "pytorch_model-00002-of-00002.bin"}  # fmt: skip
    (sharded / BIN_INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    with open_tensors(resolve_checkpoint(sharded)) as source:
        assert source.keys_by_file() == [["a"], ["b", "c"]]
        for key in state:
            _assert_same(source.read(key), want[key])

    save_safetensors(single, {"only": np.ones(1, np.float32)})
    assert resolve_checkpoint(single).format == "safetensors"


# ----------------------------------------------------------------------------- Hub cache


COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _hub_cache(cache, repo_id, source_dir, commit=COMMIT, ref="main"):
    """Lay out a repo in a huggingface_hub cache as hf_hub_download leaves it: content-addressed
    blobs, a snapshot folder of relative symlinks, and a ref file naming the commit."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / ref).write_text(commit)  # no newline: the hub reads it verbatim
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for path in source_dir.iterdir():
        data = path.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / path.name).symlink_to(os.path.relpath(blob, snapshot))
    return snapshot


def test_hub_id_resolves_from_the_cache_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tensors = _tensors()
    _save(tmp_path / "src", tensors)
    snapshot = _hub_cache(tmp_path / "cache", "org/name", tmp_path / "src")

    checkpoint = resolve_checkpoint("org/name", cache_dir=tmp_path / "cache")
    assert checkpoint.directory == snapshot
    assert checkpoint.weight_files == (snapshot / SAFE_WEIGHTS,)
    with open_tensors(checkpoint) as source:
        for key, want in tensors.items():
            _assert_same(source.read(key), want)


def test_hub_sharded_checkpoint_and_revisions(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # local_files_only alone keeps it offline
    tensors = _tensors()
    _save(tmp_path / "src", tensors, max_shard_size=100)
    snapshot = _hub_cache(tmp_path / "cache", "org/sharded", tmp_path / "src")
    _save(tmp_path / "v1", {"old": np.ones(2, np.float32)})
    old_commit = "f" * 40
    old_snapshot = _hub_cache(tmp_path / "cache", "org/sharded", tmp_path / "v1", old_commit, "v1")

    checkpoint = resolve_checkpoint(
        "org/sharded", cache_dir=tmp_path / "cache", local_files_only=True
    )
    assert checkpoint.directory == snapshot and len(checkpoint.weight_files) == 4
    with open_tensors(checkpoint) as source:
        for key, want in tensors.items():
            _assert_same(source.read(key), want)
    for revision in ["v1", old_commit]:
        old = resolve_checkpoint("org/sharded", revision=revision, cache_dir=tmp_path / "cache", local_files_only=True)  # fmt: skip
        assert old.directory == old_snapshot
    with pytest.raises(CheckpointError, match="'org/sharded' at revision 'v2'"):
        resolve_checkpoint("org/sharded", revision="v2", cache_dir=tmp_path / "cache", local_files_only=True)  # fmt: skip


def test_hub_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = tmp_path / "cache"
    with pytest.raises(CheckpointError, match=r"'org/uncached'.*config\.json.*offline") as error:
        resolve_checkpoint("org/uncached", cache_dir=cache)
    assert str(cache) in str(error.value)

    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "config.json").write_text(CONFIG_TEXT)
    _hub_cache(cache, "org/no-weights", tmp_path / "src")
    with pytest.raises(CheckpointError, match=f"'org/no-weights'.*{SAFE_WEIGHTS}.*{BIN_INDEX}"):
        resolve_checkpoint("org/no-weights", cache_dir=cache)

    with pytest.raises(CheckpointError, match="'a/b/c'"):
        resolve_checkpoint("a/b/c", cache_dir=cache)


def test_hub_downloads_pass_options_through_and_hub_errors_are_mapped(tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub import errors

    _save(tmp_path / "src", {"x": np.ones(2, np.float32)})
    calls = []

    def download(repo_id, filename, **options):  # stands in for the network
        calls.append((repo_id, filename, options))
        if (tmp_path / "src" / filename).exists():
            return str(tmp_path / "src" / filename)
        raise errors.RemoteEntryNotFoundError(f"404: {filename}", response=_FakeResponse())

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    options = dict(revision="v2", cache_dir=tmp_path / "c", token="secret", local_files_only=False)
    checkpoint = resolve_checkpoint("org/name", **options)
    assert checkpoint.weight_files == (tmp_path / "src" / SAFE_WEIGHTS,)
    assert [name for _, name, _ in calls] == ["config.json", SAFE_WEIGHTS, "generation_config.json"]
    assert all(repo == "org/name" and kwargs == options for repo, _, kwargs in calls)

    for error, message in [
        (errors.RepositoryNotFoundError("401", response=_FakeResponse()), "repository not found"),
        (errors.RevisionNotFoundError("404", response=_FakeResponse()), "no such revision"),
        (errors.HfHubHTTPError("500 server down", response=_FakeResponse()), "500 server down"),
        (errors.RemoteEntryNotFoundError("404 no config", response=_FakeResponse()), "no config"),
    ]:

        def failing(*args, error=error, **kwargs):
            raise error

        monkeypatch.setattr(huggingface_hub, "hf_hub_download", failing)
        with pytest.raises(
            CheckpointError, match=f"Hub repo 'org/name' at revision 'v2': .*{message}"
        ):
            resolve_checkpoint("org/name", **options)


class _FakeResponse:
    headers: dict = {}
    request = None
    status_code = 404
