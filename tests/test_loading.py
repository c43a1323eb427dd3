"""Loading as transformers does it: base and task checkpoints, reports, every problem at once,
mismatched sizes, legacy names, sharding, dtypes, hub ids, bad and malicious inputs."""

from __future__ import annotations

import json
import logging
import os
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

import flaxauto
from flaxauto.converters import layout
from flaxauto.converters.files import save_safetensors
from references import (
    max_diff,
    run_torch,
    save_bin,
    text_inputs,
    tiny_config,
    torch_model,
    unsupported_model_type,
)

INPUTS = text_inputs("bert", "base")


def _state_numpy(model, prefix: str = "") -> dict[str, np.ndarray]:
    return {prefix + k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _write(directory, config, tensors: dict) -> str:
    save_safetensors(directory, tensors, extra_files={"config.json": config.to_json_string()})
    return str(directory)


def _saved(task: str, tmp_path_factory):
    model = torch_model("bert", task)
    directory = tmp_path_factory.mktemp(f"bert-{task}")
    model.save_pretrained(directory)
    return model, directory


@pytest.fixture(scope="module")
def bert_base(tmp_path_factory):
    return _saved("base", tmp_path_factory)


@pytest.fixture(scope="module")
def bert_classifier(tmp_path_factory):
    return _saved("sequence-classification", tmp_path_factory)


# --- base and task checkpoints ------------------------------------------------------------------


def test_base_checkpoint_into_task_model_initialises_and_reports_the_head(bert_base, caplog):
    torch_base, directory = bert_base
    with caplog.at_level(logging.WARNING, logger="flaxauto"):
        model, info = flaxauto.AutoModelForSequenceClassification.from_pretrained(
            directory, output_loading_info=True
        )
    assert sorted(info["missing_keys"]) == ["classifier.bias", "classifier.weight"]
    assert "classifier.weight" in caplog.text
    # the backbone is the checkpoint's: compare through the pooled features
    reference = run_torch(torch_base, INPUTS).pooler_output.numpy()
    classifier = model.head.classifier.out
    expected = reference @ np.asarray(classifier.kernel[...]) + np.asarray(classifier.bias[...])
    assert max_diff(model(**INPUTS).logits, expected) <= 1e-4


def test_prefixed_base_checkpoint_loads_into_task_and_base_models(bert_base, tmp_path):
    torch_base, _ = bert_base
    directory = _write(tmp_path, torch_base.config, _state_numpy(torch_base, prefix="bert."))
    _, info = flaxauto.AutoModelForTokenClassification.from_pretrained(
        directory, output_loading_info=True
    )
    assert sorted(info["missing_keys"]) == ["classifier.bias", "classifier.weight"]
    assert info["unexpected_keys"] == ["bert.pooler.dense.bias", "bert.pooler.dense.weight"]
    base = flaxauto.AutoModel.from_pretrained(directory)
    reference = run_torch(torch_base, INPUTS)
    assert max_diff(base(**INPUTS).last_hidden_state, reference.last_hidden_state) <= 1e-4


def test_task_checkpoint_into_base_model_drops_the_head(bert_classifier):
    torch_task, directory = bert_classifier
    model, info = flaxauto.AutoModel.from_pretrained(directory, output_loading_info=True)
    assert sorted(info["unexpected_keys"]) == ["classifier.bias", "classifier.weight"]
    assert not info["missing_keys"]
    reference = run_torch(torch_task.bert, INPUTS)
    assert max_diff(model(**INPUTS).pooler_output, reference.pooler_output) <= 1e-4


def test_checkpoint_without_pooler_initialises_it_in_base_model(tmp_path):
    torch_tokens = torch_model("bert", "token-classification")
    torch_tokens.save_pretrained(tmp_path)
    _, info = flaxauto.AutoModel.from_pretrained(tmp_path, output_loading_info=True)
    assert sorted(info["missing_keys"]) == ["pooler.dense.bias", "pooler.dense.weight"]


def test_legacy_names_and_tied_decoder_keys_load_silently(tmp_path):
    torch_mlm = torch_model("bert", "masked-lm")
    state = _state_numpy(torch_mlm)
    state["cls.predictions.decoder.weight"] = state["bert.embeddings.word_embeddings.weight"]
    state["cls.predictions.decoder.bias"] = state["cls.predictions.bias"]
    state["bert.embeddings.position_ids"] = np.arange(64)[None]
    for name in [k for k in state if k.endswith("LayerNorm.weight")]:
        state[name[: -len("weight")] + "gamma"] = state.pop(name)
    for name in [k for k in state if k.endswith("LayerNorm.bias")]:
        state[name[: -len("bias")] + "beta"] = state.pop(name)
    directory = _write(tmp_path, torch_mlm.config, state)
    model, info = flaxauto.AutoModelForMaskedLM.from_pretrained(directory, output_loading_info=True)
    assert info == {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": []}
    assert max_diff(model(**INPUTS).logits, run_torch(torch_mlm, INPUTS).logits) <= 1e-4


def test_rotary_inverse_frequencies_of_older_checkpoints_are_ignored(tmp_path):
    """transformers before 4.31 saved each layer's rotary_emb.inv_freq; Llama declares it
    ignorable (it is recomputed from the config)."""
    torch_lm = torch_model("llama", "causal-lm")
    state = _state_numpy(torch_lm)
    inv_freq = torch_lm.model.rotary_emb.inv_freq.numpy()
    for layer in range(torch_lm.config.num_hidden_layers):
        state[f"model.layers.{layer}.self_attn.rotary_emb.inv_freq"] = inv_freq
    directory = _write(tmp_path, torch_lm.config, state)
    model, info = flaxauto.AutoModelForCausalLM.from_pretrained(directory, output_loading_info=True)
    assert info == {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": []}
    ids = {"input_ids": np.random.default_rng(0).integers(3, 99, (2, 7))}
    assert max_diff(model(**ids).logits, run_torch(torch_lm, ids).logits) <= 1e-4


def test_ignored_buffers_are_each_familys_own(bert_base, tmp_path):
    """Llama's ignorable buffer in a BERT checkpoint is an unexpected tensor, not dropped."""
    torch_base, _ = bert_base
    state = _state_numpy(torch_base)
    state["encoder.layer.0.attention.self.rotary_emb.inv_freq"] = np.ones(4, np.float32)
    directory = _write(tmp_path, torch_base.config, state)
    with pytest.raises(
        flaxauto.CheckpointError, match=r"unexpected: encoder\.layer\.0\..*inv_freq"
    ):
        flaxauto.AutoModel.from_pretrained(directory)


# --- problems: all of them, in one error ---------------------------------------------------------


def test_every_problem_is_reported_together(bert_classifier, tmp_path):
    torch_task, _ = bert_classifier
    state = _state_numpy(torch_task)
    del state["bert.encoder.layer.1.output.dense.weight"]
    del state["bert.embeddings.LayerNorm.bias"]
    state["bert.encoder.layer.7.output.dense.weight"] = np.zeros((32, 37), np.float32)
    state["bert.encoder.layer.0.attention.self.query.weight"] = np.zeros((31, 32), np.float32)
    directory = _write(tmp_path, torch_task.config, state)
    with pytest.raises(flaxauto.CheckpointError) as error:
        flaxauto.AutoModelForSequenceClassification.from_pretrained(directory)
    message = str(error.value)
    assert "4 problem(s)" in message
    for expected in (
        "missing: bert.encoder.layer.1.output.dense.weight",
        "missing: bert.embeddings.LayerNorm.bias",
        "unexpected: bert.encoder.layer.7.output.dense.weight",
        "mis-shaped: bert.encoder.layer.0.attention.self.query.weight is (31, 32)",
    ):
        assert expected in message


def test_mismatched_sizes_raise_unless_ignored(bert_classifier):
    _, directory = bert_classifier
    with pytest.raises(flaxauto.CheckpointError, match="mis-shaped: classifier.weight"):
        flaxauto.AutoModelForSequenceClassification.from_pretrained(directory, num_labels=5)
    model, info = flaxauto.AutoModelForSequenceClassification.from_pretrained(
        directory, num_labels=5, ignore_mismatched_sizes=True, output_loading_info=True
    )
    assert sorted(k for k, _, _ in info["mismatched_keys"]) == [
        "classifier.bias",
        "classifier.weight",
    ]
    assert model(**INPUTS).logits.shape == (len(INPUTS["input_ids"]), 5)


def test_config_overrides_reach_the_config(bert_classifier):
    _, directory = bert_classifier
    labels = {0: "neg", 1: "neutral", 2: "pos"}
    model = flaxauto.AutoModelForSequenceClassification.from_pretrained(
        directory, id2label=labels, problem_type="multi_label_classification"
    )
    assert model.config.id2label == labels and model.config.num_labels == 3
    assert model.config.problem_type == "multi_label_classification"


def test_loaded_weights_are_never_randomly_initialised(bert_classifier, monkeypatch):
    _, directory = bert_classifier
    calls = []
    original = layout.initial_value
    monkeypatch.setattr(
        "flaxauto.modeling.initial_value", lambda slot, *a: calls.append(slot) or original(slot, *a)
    )
    flaxauto.AutoModelForSequenceClassification.from_pretrained(directory)
    assert calls == []
    flaxauto.AutoModelForMaskedLM.from_pretrained(directory, output_loading_info=True)
    assert {s.torch_name for s in calls} == {
        "cls.predictions.bias",
        "cls.predictions.transform.dense.weight",
        "cls.predictions.transform.dense.bias",
        "cls.predictions.transform.LayerNorm.weight",
        "cls.predictions.transform.LayerNorm.bias",
    }


# --- losses as transformers computes them ----------------------------------------------------------


@pytest.mark.parametrize(
    "num_labels, problem_type, make_labels",
    [
        (1, None, lambda rng: rng.normal(size=4).astype(np.float32)),
        (3, None, lambda rng: rng.integers(0, 3, size=4)),
        (3, None, lambda rng: rng.integers(0, 2, size=(4, 3)).astype(np.float32)),
        (3, "regression", lambda rng: rng.normal(size=(4, 3)).astype(np.float32)),
    ],
    ids=["regression", "single-label", "multi-label", "regression-3"],
)
def test_sequence_classification_losses(tmp_path, num_labels, problem_type, make_labels):
    torch_task = torch_model(
        "bert", "sequence-classification", num_labels=num_labels, problem_type=problem_type
    )
    torch_task.save_pretrained(tmp_path)
    labels = make_labels(np.random.default_rng(0))
    reference = run_torch(torch_task, {**INPUTS, "labels": labels})
    model = flaxauto.AutoModelForSequenceClassification.from_pretrained(tmp_path)
    assert max_diff(model(**INPUTS, labels=labels).loss, reference.loss) <= 1e-5


# --- sharded checkpoints, dtypes -------------------------------------------------------------------


def test_sharded_safetensors_and_sharded_bin(bert_classifier, tmp_path):
    torch_task, _ = bert_classifier
    torch_task.save_pretrained(tmp_path / "st", max_shard_size="20KB")
    assert (tmp_path / "st" / "model.safetensors.index.json").exists()
    reference = run_torch(torch_task, INPUTS).logits
    model = flaxauto.AutoModelForSequenceClassification.from_pretrained(tmp_path / "st")
    assert max_diff(model(**INPUTS).logits, reference) <= 1e-4

    state = torch_task.state_dict()
    names = list(state)
    shards = {
        "pytorch_model-00001-of-00002.bin": names[:20],
        "pytorch_model-00002-of-00002.bin": names[20:],
    }
    directory = tmp_path / "bin"
    directory.mkdir()
    torch_task.config.save_pretrained(directory)
    for file, keys in shards.items():
        torch.save({k: state[k] for k in keys}, directory / file)
    index = {"metadata": {}, "weight_map": {k: f for f, keys in shards.items() for k in keys}}
    (directory / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    model = flaxauto.AutoModelForSequenceClassification.from_pretrained(directory)
    assert max_diff(model(**INPUTS).logits, reference) <= 1e-4


def test_bfloat16_parameters_load_compute_and_save(bert_classifier, tmp_path):
    torch_task, directory = bert_classifier
    model = flaxauto.AutoModelForSequenceClassification.from_pretrained(
        directory, param_dtype=jnp.bfloat16
    )
    dtypes = {x.dtype for x in jax.tree.leaves(nnx.state(model, nnx.Param))}
    assert dtypes == {jnp.dtype(jnp.bfloat16)}
    reference = run_torch(torch_task, INPUTS).logits.numpy()
    logits = np.asarray(model(**INPUTS).logits, np.float32)
    assert np.abs(logits - reference).max() < 0.1  # bf16 rounding of weights and activations
    model.save_pretrained(tmp_path)
    reloaded = transformers.BertForSequenceClassification.from_pretrained(
        tmp_path, dtype=torch.bfloat16
    )
    for name, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, torch_task.state_dict()[name].to(torch.bfloat16)), name


def test_float32_params_with_bfloat16_compute(bert_classifier):
    torch_task, directory = bert_classifier
    model = flaxauto.AutoModelForSequenceClassification.from_pretrained(
        directory, dtype=jnp.bfloat16
    )
    assert model.backbone.embeddings.word_embeddings.embedding[...].dtype == jnp.float32
    assert model(**INPUTS).logits.dtype == jnp.bfloat16
    reference = run_torch(torch_task, INPUTS).logits.numpy()
    assert np.abs(np.asarray(model(**INPUTS).logits, np.float32) - reference).max() < 0.1


# --- training mode ------------------------------------------------------------------------------


def test_dropout_in_training_mode_and_deterministic_inference(bert_classifier):
    _, directory = bert_classifier
    model = flaxauto.AutoModelForSequenceClassification.from_pretrained(directory, seed=1)
    first = np.asarray(model(**INPUTS).logits)
    assert np.array_equal(first, np.asarray(model(**INPUTS).logits))
    model.train()
    noisy = [np.asarray(model(**INPUTS).logits) for _ in range(2)]
    assert not np.array_equal(noisy[0], noisy[1]) and not np.array_equal(noisy[0], first)
    model.eval()
    assert np.array_equal(first, np.asarray(model(**INPUTS).logits))


# --- the registry's errors --------------------------------------------------------------------------


def test_unknown_model_type_names_type_task_and_alternatives(tmp_path):
    model_type = unsupported_model_type()
    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError) as error:
        flaxauto.AutoModelForMaskedLM.from_pretrained(tmp_path)
    message = str(error.value)
    assert f"'{model_type}'" in message and "masked-lm" in message and "bert" in message


def test_task_a_family_does_not_serve(bert_base):
    _, directory = bert_base
    with pytest.raises(ValueError, match=r"'bert' does not support task 'image-classification'"):
        flaxauto.AutoModelForImageClassification.from_pretrained(directory)


@pytest.mark.parametrize(
    "overrides, attribute",
    [
        ({"position_embedding_type": "relative_key"}, "position_embedding_type"),
        ({"hidden_act": "mish"}, "hidden_act"),
        ({"is_decoder": True}, "is_decoder"),
    ],
)
def test_unimplemented_config_values_raise_naming_the_attribute(overrides, attribute):
    config = tiny_config("bert", **overrides)
    with pytest.raises(NotImplementedError, match=attribute):
        flaxauto.AutoModel.from_config(config)


def test_auto_classes_are_not_instantiated():
    with pytest.raises(OSError, match="from_pretrained"):
        flaxauto.AutoModel()


# --- bad inputs --------------------------------------------------------------------------------------


def test_missing_directory_and_missing_weights(tmp_path):
    with pytest.raises(flaxauto.CheckpointError, match="no such directory"):
        flaxauto.AutoModel.from_pretrained(tmp_path / "nope")
    tiny_config("bert").save_pretrained(tmp_path)
    with pytest.raises(flaxauto.CheckpointError, match="no weights"):
        flaxauto.AutoModel.from_pretrained(tmp_path)


def test_truncated_safetensors(bert_base, tmp_path):
    _, directory = bert_base
    data = (directory / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    (tmp_path / "config.json").write_text((directory / "config.json").read_text())
    with pytest.raises(flaxauto.CheckpointError, match="model.safetensors"):
        flaxauto.AutoModel.from_pretrained(tmp_path)


def test_corrupt_index(bert_base, tmp_path):
    _, directory = bert_base
    (tmp_path / "config.json").write_text((directory / "config.json").read_text())
    (tmp_path / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(flaxauto.CheckpointError, match="index"):
        flaxauto.AutoModel.from_pretrained(tmp_path)


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_executes_nothing(bert_base, tmp_path):
    torch_base, _ = bert_base
    marker = tmp_path / "pwned"
    save_bin(torch_base, tmp_path)
    state = dict(torch_base.state_dict())
    state["embeddings.extra"] = _Payload(marker)
    torch.save(state, tmp_path / "pytorch_model.bin")
    assert zipfile.is_zipfile(tmp_path / "pytorch_model.bin")
    with pytest.raises(flaxauto.UnsafeCheckpointError, match="system"):
        flaxauto.AutoModel.from_pretrained(tmp_path)
    assert not marker.exists()


# --- hub ids through the huggingface_hub cache ------------------------------------------------------


def test_hub_id_resolves_from_an_offline_cache(bert_classifier, tmp_path, monkeypatch):
    torch_task, directory = bert_classifier
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--flaxauto-tests--tiny-bert"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        (snapshot / name).write_bytes((directory / name).read_bytes())
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = flaxauto.AutoModelForSequenceClassification.from_pretrained(
        "flaxauto-tests/tiny-bert", cache_dir=tmp_path
    )
    assert max_diff(model(**INPUTS).logits, run_torch(torch_task, INPUTS).logits) <= 1e-4
    with pytest.raises(flaxauto.CheckpointError):
        flaxauto.AutoModel.from_pretrained("flaxauto-tests/not-cached", cache_dir=tmp_path)


# --- saving ----------------------------------------------------------------------------------------


def test_failed_save_keeps_the_previous_checkpoint(bert_classifier, tmp_path, monkeypatch):
    _, directory = bert_classifier
    model = flaxauto.AutoModelForSequenceClassification.from_pretrained(directory)
    model.save_pretrained(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def broken_export(model):
        yield "bert.embeddings.word_embeddings.weight", np.zeros((2, 2), np.float32)
        raise RuntimeError("disk full")

    monkeypatch.setattr("flaxauto.modeling.export_tensors", broken_export)
    with pytest.raises(RuntimeError, match="disk full"):
        model.save_pretrained(tmp_path, max_shard_size=10)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_save_shards_past_max_shard_size(bert_classifier, tmp_path):
    torch_task, directory = bert_classifier
    model = flaxauto.AutoModelForSequenceClassification.from_pretrained(directory)
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    reloaded = transformers.BertForSequenceClassification.from_pretrained(tmp_path)
    for name, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, torch_task.state_dict()[name]), name


def test_bfloat16_checkpoint_upcasts_to_float32_params(tmp_path):
    torch_task = torch_model("bert", "sequence-classification")
    torch_task.to(torch.bfloat16).save_pretrained(tmp_path)
    model = flaxauto.AutoModelForSequenceClassification.from_pretrained(tmp_path)
    kernel = model.head.classifier.out.kernel[...]
    assert kernel.dtype == jnp.float32
    expected = torch_task.classifier.weight.detach().float().numpy().T
    assert np.array_equal(np.asarray(kernel), expected)


def test_loading_streams_one_tensor_at_a_time(tmp_path):
    """Host memory while loading stays near one tensor beyond the parameters themselves (on CPU
    the device arrays adopt the host buffers the tensors were read into, so tracemalloc counts
    the parameters too: what must stay small is the peak above what the model keeps)."""
    import tracemalloc

    config = tiny_config(
        "bert", vocab_size=1000, hidden_size=256, intermediate_size=1024, num_hidden_layers=6
    )
    transformers.BertModel(config).save_pretrained(tmp_path)
    model = transformers.BertModel(config)
    sizes = [p.numel() * 4 for p in model.parameters()]
    tracemalloc.start()
    try:
        loaded = flaxauto.AutoModel.from_pretrained(tmp_path)
        kept, peak = tracemalloc.get_traced_memory()  # while the model is alive
        del loaded
    finally:
        tracemalloc.stop()
    assert peak - kept < 4 * max(sizes) < sum(sizes) / 4, (peak, kept, max(sizes), sum(sizes))


def test_progress_bar_only_when_asked(bert_base, capsys):
    _, directory = bert_base
    flaxauto.AutoModel.from_pretrained(directory)
    assert "loading" not in capsys.readouterr().err  # stderr is not a terminal here
    flaxauto.AutoModel.from_pretrained(directory, progress=True)
    assert "loading" in capsys.readouterr().err


def test_loading_and_saving_never_import_torch(bert_classifier, tmp_path):
    """torch is a test-only dependency: an interpreter where torch cannot be imported (as if not
    installed; transformers then skips it too) loads .bin and safetensors and saves."""
    import subprocess
    import sys

    torch_task, directory = bert_classifier
    save_bin(torch_task, tmp_path / "bin")
    script = f"""
import sys
sys.modules["torch"] = None  # `import torch` now fails and find_spec("torch") says absent
import flaxauto
for path in ({str(directory)!r}, {str(tmp_path / "bin")!r}):
    model = flaxauto.AutoModelForSequenceClassification.from_pretrained(path)
model.save_pretrained({str(tmp_path / "out")!r})
flaxauto.AutoModel.from_pretrained({str(tmp_path / "out")!r})
print("torch-free")
"""
    # run outside the checkout: `python -c` puts the working directory first on sys.path
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert "torch-free" in result.stdout
