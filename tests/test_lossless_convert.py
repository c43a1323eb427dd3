"""`flaxauto convert` loses nothing: the task comes from the tensors when config.json names no
architecture flaxauto knows (or convert refuses, naming --task), tokenizer and processor files come
along, a non-empty destination needs --force, an interrupted convert leaves nothing half-written,
and dtypes are kept (param_dtype="auto", convert's default). Checked against the live PyTorch
models' tensors, byte for byte."""

from __future__ import annotations

import json
import shutil

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers
from flax import nnx

import flaxauto
from flaxauto import cli
from flaxauto.cli import main
from flaxauto.converters.errors import CheckpointError

TINY = dict(
    vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
    intermediate_size=37, num_labels=3,
)  # fmt: skip
SIDE_FILES = {
    "tokenizer.json": '{"version": "1.0"}',
    "vocab.txt": "[PAD]\nhello\n",
    "tokenizer_config.json": '{"model_max_length": 64}',
    "special_tokens_map.json": "{}",
    "preprocessor_config.json": '{"do_resize": false}',
}


def _run(capsys, *argv):
    code = main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _random(model_class, seed=0, **overrides):
    torch.manual_seed(seed)
    model = model_class(transformers.BertConfig(**(TINY | overrides)))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    return model.eval()


def _bytes(state: dict) -> dict:
    return {k: (str(v.dtype), v.detach().contiguous().view(torch.uint8).numpy().tobytes())
            for k, v in state.items()}  # fmt: skip


def _save(model, directory, *, architectures=True, side_files=True):
    model.save_pretrained(directory)
    if not architectures:
        config = json.loads((directory / "config.json").read_text())
        del config["architectures"]
        (directory / "config.json").write_text(json.dumps(config))
    if side_files:
        for name, text in SIDE_FILES.items():
            (directory / name).write_text(text)
    return directory


def test_without_architectures_the_task_comes_from_the_tensor_names(tmp_path, capsys):
    original = _random(transformers.BertForMaskedLM)
    src = _save(original, tmp_path / "src", architectures=False)
    code, out, err = _run(capsys, "convert", src, tmp_path / "dst", "--no-progress")
    assert code == 0, err
    assert "masked-lm" in out and "5 tokenizer/processor file(s) copied" in out
    loaded = transformers.BertForMaskedLM.from_pretrained(tmp_path / "dst")
    assert _bytes(loaded.state_dict()) == _bytes(original.state_dict())
    for name, text in SIDE_FILES.items():  # the tokenizer and processor files came along
        assert (tmp_path / "dst" / name).read_text() == text


@pytest.mark.parametrize(
    ("make", "why"),
    [
        # a one-label (regression) classifier [1, H] after the pooler: a multiple-choice
        # head has the same names and shapes
        (
            lambda: _random(transformers.BertForSequenceClassification, num_labels=1),
            "fit sequence-classification and multiple-choice alike",
        ),
        # masked-LM and next-sentence heads at once: no flaxauto task takes both
        (lambda: _random(transformers.BertForPreTraining), "no task's model takes exactly"),
    ],
)
def test_a_task_the_tensors_do_not_tell_is_refused_naming_task(tmp_path, capsys, make, why):
    src = _save(make(), tmp_path / "src", architectures=False)
    code, _, err = _run(capsys, "convert", src, tmp_path / "dst", "--no-progress")
    assert code == 1 and "--task" in err and why in err, err
    assert not (tmp_path / "dst").exists()


def test_inferred_tasks_for_every_bert_head(tmp_path, capsys):
    """Where the names tell (a pooler or not, the head's names), the inferred task is right."""
    for architecture, task in [
        ("BertForSequenceClassification", "sequence-classification"),
        ("BertForTokenClassification", "token-classification"),
        ("BertForQuestionAnswering", "question-answering"),
        ("BertModel", "base"),
    ]:
        original = _random(getattr(transformers, architecture))
        src = _save(original, tmp_path / architecture, architectures=False, side_files=False)
        code, out, err = _run(capsys, "convert", src, tmp_path / f"{architecture}-out")
        assert code == 0 and f", {task})" in out, err
        loaded = getattr(transformers, architecture).from_pretrained(
            tmp_path / f"{architecture}-out"
        )
        assert _bytes(loaded.state_dict()) == _bytes(original.state_dict())


def test_an_architecture_flaxauto_lacks_is_not_converted_as_the_base_model(tmp_path, capsys):
    src = _save(_random(transformers.BertForPreTraining), tmp_path / "src")
    code, _, err = _run(capsys, "convert", src, tmp_path / "dst", "--no-progress")
    assert code == 1 and "BertForPreTraining" in err and "--task" in err, err


def test_an_explicit_task_may_drop_a_head_and_says_which(tmp_path, capsys):
    original = _random(transformers.BertForSequenceClassification)
    src = _save(original, tmp_path / "src")
    code, _, err = _run(capsys, "convert", src, tmp_path / "dst", "--task", "base")
    assert (
        code == 0 and "dropped, as --task base asked: classifier.bias, classifier.weight" in err
    ), err
    base = transformers.BertModel.from_pretrained(tmp_path / "dst")
    assert _bytes(base.state_dict()) == _bytes(original.bert.state_dict())
    # but never makes up a tensor the checkpoint lacks (BertForMaskedLM has no pooler)
    src = _save(_random(transformers.BertForMaskedLM), tmp_path / "mlm")
    code, _, err = _run(capsys, "convert", src, tmp_path / "x", "--task", "base")
    assert code == 1 and "would make up (random) pooler.dense.weight" in err, err
    assert not (tmp_path / "x").exists()


def test_a_non_empty_destination_needs_force(tmp_path, capsys):
    src = _save(_random(transformers.BertForMaskedLM), tmp_path / "src")
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "notes.txt").write_text("mine")
    code, _, err = _run(capsys, "convert", src, dst, "--no-progress")
    assert code == 1 and "--force" in err and sorted(p.name for p in dst.iterdir()) == ["notes.txt"]
    code, _, err = _run(capsys, "convert", src, dst, "--no-progress", "--force")
    assert code == 0, err
    assert not (dst / "notes.txt").exists() and (dst / "model.safetensors").is_file()


@pytest.mark.parametrize("existing", [False, True])
def test_an_interrupted_convert_leaves_nothing_half_written(
    tmp_path, capsys, monkeypatch, existing
):
    src = _save(_random(transformers.BertForMaskedLM), tmp_path / "src")
    dst = tmp_path / "dst"
    if existing:
        shutil.copytree(src, dst)
    before = {p.name: p.read_bytes() for p in dst.iterdir()} if existing else None
    copies, real_copy = [], shutil.copyfile

    def failing_copy(source, target, **options):  # the disk fills while copying the tokenizer
        copies.append(target)
        if len(copies) == 3:
            raise OSError(28, "No space left on device")
        return real_copy(source, target, **options)

    monkeypatch.setattr(cli.shutil, "copyfile", failing_copy)
    argv = ["convert", src, dst, "--no-progress"] + (["--force"] if existing else [])
    code, _, err = _run(capsys, *argv)
    assert code == 1 and "No space left" in err
    after = {p.name: p.read_bytes() for p in dst.iterdir()} if dst.exists() else None
    assert after == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def _mixed_checkpoint(directory):
    """A BERT checkpoint whose tensors are fp32, bf16 and fp16 (mixed, as some hub files are)."""
    original = _random(transformers.BertForSequenceClassification)
    original.save_pretrained(directory)
    path = directory / "model.safetensors"
    tensors = safetensors.numpy.load_file(path)
    kinds = [np.float32, ml_dtypes.bfloat16, np.float16]
    mixed = {k: v.astype(kinds[i % 3]) for i, (k, v) in enumerate(sorted(tensors.items()))}
    safetensors.numpy.save_file(mixed, path, metadata={"format": "pt"})
    return mixed


def test_param_dtype_auto_keeps_each_tensors_dtype(tmp_path):
    mixed = _mixed_checkpoint(tmp_path / "src")
    model = flaxauto.AutoModelForSequenceClassification.from_pretrained(
        tmp_path / "src", param_dtype="auto"
    )
    model.save_pretrained(tmp_path / "out")
    saved = safetensors.numpy.load_file(tmp_path / "out" / "model.safetensors")
    assert saved.keys() == mixed.keys()
    for key, want in mixed.items():
        assert saved[key].dtype == want.dtype and saved[key].tobytes() == want.tobytes(), key
    with pytest.raises(ValueError, match="param_dtype='auto'.*from_pretrained"):
        flaxauto.AutoModelForSequenceClassification.from_config(model.config, param_dtype="auto")
    # by bytes the checkpoint is mostly fp32 here: that is the compute dtype auto picks
    assert model.backbone.embeddings.word_embeddings.embedding.get_value().dtype in (
        np.dtype(v.dtype) for k, v in mixed.items() if "word_embeddings" in k
    )


def test_a_bf16_checkpoint_stays_bf16_and_convert_keeps_it_by_default(tmp_path, capsys):
    original = _random(transformers.BertForMaskedLM).to(torch.bfloat16)
    src = _save(original, tmp_path / "src")
    model = flaxauto.AutoModelForMaskedLM.from_pretrained(src, param_dtype="auto")
    leaves = nnx.state(model, nnx.Param)
    assert {str(x.dtype) for x in __import__("jax").tree.leaves(leaves)} == {"bfloat16"}
    code, out, err = _run(capsys, "convert", src, tmp_path / "dst", "--no-progress")
    assert code == 0 and "in bfloat16" in out, err
    loaded = transformers.BertForMaskedLM.from_pretrained(tmp_path / "dst", dtype=torch.bfloat16)
    assert _bytes(loaded.state_dict()) == _bytes(original.state_dict())


def test_a_non_floating_tensor_for_a_floating_parameter_is_refused(tmp_path):
    _save(_random(transformers.BertForMaskedLM), tmp_path / "src", side_files=False)
    path = tmp_path / "src" / "model.safetensors"
    tensors = safetensors.numpy.load_file(path)
    key = "bert.encoder.layer.0.attention.self.query.weight"
    tensors[key] = tensors[key].astype(np.int32)
    safetensors.numpy.save_file(tensors, path, metadata={"format": "pt"})
    for param_dtype in (None, "auto"):
        with pytest.raises(CheckpointError, match=f"wrong kind: {key} is int32.*not cast"):
            flaxauto.AutoModelForMaskedLM.from_pretrained(tmp_path / "src", param_dtype=param_dtype)
