"""Robustness that stays: damaged checkpoints raise only CheckpointError (seeded fuzzing of
safetensors headers and .bin archives, a few hundred cases), an old Llama checkpoint carrying
`rotary_emb.inv_freq` loads, and two loads in threads give correct models."""

from __future__ import annotations

import io
import json
import struct
import zipfile
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import safetensors.numpy
import torch

import flaxauto
from flaxauto.converters.errors import CheckpointError
from flaxauto.converters.files import open_tensors, resolve_checkpoint
from references import max_diff, run_torch, text_inputs, torch_model

CASES = 300
TOLERANCE = 1e-4


def _read_everything(directory) -> None:
    """What a load does with the files: resolve, list, and read every tensor whole and sliced."""
    with open_tensors(resolve_checkpoint(directory)) as source:
        for key in source.keys():
            source.dtype(key)
            shape = source.shape(key)
            source.read(key)
            if shape:
                source.read_slice(key, (slice(0, 1),))


def _only_checkpoint_errors(directory) -> bool:
    try:
        _read_everything(directory)
    except CheckpointError:
        return False
    return True


def _valid_safetensors() -> bytes:
    tensors = {
        "a.weight": np.arange(12, dtype=np.float32).reshape(3, 4),
        "b.bias": np.ones(5, np.float16),
        "c.ids": np.arange(4, dtype=np.int64),
    }
    return safetensors.numpy.save(tensors, metadata={"format": "pt"})


def _header_mutations(rng, data: bytes):
    """Damage aimed at the header: its length, its bytes, its JSON values; then the body."""
    length = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + length])
    body = data[8 + length :]
    kind = rng.integers(6)
    if kind == 0:  # a wrong header length
        wrong = int(
            rng.choice([0, 1, length - 1, length + 1, len(data), 2**63, rng.integers(2**40)])
        )
        return struct.pack("<Q", wrong) + data[8:]
    if kind == 1:  # random bytes in the header
        raw = bytearray(data)
        for _ in range(rng.integers(1, 6)):
            raw[8 + rng.integers(length)] = rng.integers(256)
        return bytes(raw)
    if kind == 2:  # a truncated file
        return data[: rng.integers(len(data))]
    # a JSON header with one value replaced
    key = str(rng.choice([k for k in header if k != "__metadata__"]))
    field = str(rng.choice(["dtype", "shape", "data_offsets"]))
    junk = [None, -1, 2**70, "F8_E4M3", "X99", [], [-3], [1, 2, 3, 4, 5, 6], [0, 10**12],
            [48, 0], {"x": 1}, "", [2**62, 2**62], True, 1.5]  # fmt: skip
    header[key][field] = junk[rng.integers(len(junk))]
    if kind == 4:
        header = {"__metadata__": {"format": rng.choice(["pt", "flax", 7])}} | header
    if kind == 5:
        header[key] = "not an entry"
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + body


def test_fuzzed_safetensors_raise_only_checkpoint_errors(tmp_path):
    rng = np.random.default_rng(20261130)
    data = _valid_safetensors()
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    refused = 0
    for _ in range(CASES):
        (tmp_path / "model.safetensors").write_bytes(_header_mutations(rng, data))
        refused += not _only_checkpoint_errors(tmp_path)
    assert refused > CASES // 2  # the fuzzer reaches the checks, not just harmless bytes


def _valid_bin() -> bytes:
    buffer = io.BytesIO()
    tensors = {"a.weight": torch.arange(12.0).reshape(3, 4), "b.bias": torch.ones(5).half()}
    torch.save(tensors, buffer)
    return buffer.getvalue()


def _bin_mutation(rng, data: bytes) -> bytes:
    """Damage the zip itself, or a member inside an intact zip (the pickle, a storage)."""
    if rng.integers(3) == 0:
        raw = bytearray(data)
        for _ in range(rng.integers(1, 8)):
            raw[rng.integers(len(raw))] = rng.integers(256)
        return bytes(raw[: len(raw) if rng.integers(4) else rng.integers(len(raw))])
    source = zipfile.ZipFile(io.BytesIO(data))
    names = source.namelist()
    target = str(rng.choice(names))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as archive:
        for name in names:
            member = bytearray(source.read(name))
            if name == target and member:
                if rng.integers(2):
                    for _ in range(rng.integers(1, 4)):
                        member[rng.integers(len(member))] = rng.integers(256)
                else:
                    member = member[: rng.integers(len(member))]
            archive.writestr(name, bytes(member))
    return out.getvalue()


def test_fuzzed_bin_archives_raise_only_checkpoint_errors(tmp_path):
    rng = np.random.default_rng(7)
    data = _valid_bin()
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    refused = 0
    for _ in range(CASES):
        (tmp_path / "pytorch_model.bin").write_bytes(_bin_mutation(rng, data))
        refused += not _only_checkpoint_errors(tmp_path)
    assert refused > CASES // 4


def test_an_old_llama_checkpoint_with_rotary_inv_freq_loads(tmp_path):
    reference = torch_model("llama", "causal-lm")
    reference.save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    tensors = safetensors.numpy.load_file(path)
    inv_freq = reference.model.rotary_emb.inv_freq.numpy()  # older transformers saved it per layer
    for layer in range(reference.config.num_hidden_layers):
        tensors[f"model.layers.{layer}.self_attn.rotary_emb.inv_freq"] = inv_freq
    safetensors.numpy.save_file(tensors, path, metadata={"format": "pt"})
    model, info = flaxauto.AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values()), info
    batch = text_inputs("llama", "causal-lm")
    assert max_diff(model(**batch).logits, run_torch(reference, batch).logits) <= TOLERANCE


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    cases = {}
    for model_type, task in [("bert", "sequence-classification"), ("gpt2", "causal-lm")]:
        reference = torch_model(model_type, task)
        directory = tmp_path_factory.mktemp(model_type)
        reference.save_pretrained(directory)
        cases[model_type] = (task, reference, directory)
    return cases


def test_two_loads_in_threads_give_correct_models(two_checkpoints):
    def load(model_type):
        task, _, directory = two_checkpoints[model_type]
        auto_class = getattr(flaxauto, flaxauto.registry.TASK_AUTO_CLASSES[task])
        return auto_class.from_pretrained(directory)

    order = ["bert", "gpt2", "gpt2", "bert"]
    with ThreadPoolExecutor(max_workers=2) as pool:
        models = list(pool.map(load, order))
    for model_type, model in zip(order, models, strict=True):
        task, reference, _ = two_checkpoints[model_type]
        batch = text_inputs(model_type, task)
        assert max_diff(model(**batch).logits, run_torch(reference, batch).logits) <= TOLERANCE
