"""The public surface: the Auto classes, register() from outside, pmap, the README table."""

from __future__ import annotations

import re
from pathlib import Path

import jax
import numpy as np
import pytest
import transformers
from flax import nnx

import flaxauto
from flaxauto import registry
from flaxauto.heads import SequenceClassificationHead
from flaxauto.models.bert import BertModel
from references import max_diff, run_torch, text_inputs, tiny_config, torch_model

README = Path(__file__).parents[1] / "README.md"

AUTO_CLASSES = [
    "AutoModel",
    "AutoModelForSequenceClassification",
    "AutoModelForTokenClassification",
    "AutoModelForQuestionAnswering",
    "AutoModelForMaskedLM",
    "AutoModelForCausalLM",
    "AutoModelForSeq2SeqLM",
    "AutoModelForMultipleChoice",
    "AutoModelForNextSentencePrediction",
    "AutoModelForImageClassification",
    "AutoModelForAudioClassification",
    "AutoModelForSpeechSeq2Seq",
    "AutoModelForVideoClassification",
    "AutoModelForObjectDetection",
    "AutoModelForTableQuestionAnswering",
    "AutoModelForCTC",
]


@pytest.mark.parametrize("name", AUTO_CLASSES)
def test_every_auto_class_is_public(name):
    cls = getattr(flaxauto, name)
    assert callable(cls.from_pretrained) and callable(cls.from_config)
    assert registry.AUTO_CLASS_TASKS[name] == cls.task


@pytest.fixture
def forget_toy_family():
    yield
    registry._FAMILIES.pop("toy-bert", None)  # keep the registry (and README table) to built-ins


def test_register_a_family_from_outside(tmp_path, forget_toy_family):
    class ToyConfig(transformers.BertConfig):
        model_type = "toy-bert"

    flaxauto.register(
        model_types=("toy-bert",),
        backbone=BertModel,
        base_model_prefix="toy",
        heads={
            "base": flaxauto.HeadSpec(None),
            "sequence-classification": flaxauto.HeadSpec(
                SequenceClassificationHead, names={"classifier.out": "score"}
            ),
        },
        config_class=ToyConfig,
    )
    assert flaxauto.supported()["toy-bert"] == ("base", "sequence-classification")
    settings = {k: v for k, v in tiny_config("bert").to_diff_dict().items() if k != "model_type"}
    config = ToyConfig(**settings)
    model = flaxauto.AutoModelForSequenceClassification.from_config(config)
    model.save_pretrained(tmp_path)
    reloaded, info = flaxauto.AutoModelForSequenceClassification.from_pretrained(
        tmp_path, output_loading_info=True
    )
    assert info["missing_keys"] == [] and info["unexpected_keys"] == []
    inputs = text_inputs("bert", "base")
    assert np.array_equal(np.asarray(model(**inputs).logits), np.asarray(reloaded(**inputs).logits))
    with pytest.raises(ValueError, match="'toy-bert' does not support task 'masked-lm'"):
        flaxauto.AutoModelForMaskedLM.from_config(config)


@pytest.mark.parametrize("model_type", ["bert", "distilbert", "gpt2", "llama"])
def test_pmap_data_parallel_over_replicated_state(model_type, tmp_path):
    reference_model = torch_model(model_type, "sequence-classification")
    reference_model.save_pretrained(tmp_path)
    model = flaxauto.AutoModelForSequenceClassification.from_pretrained(tmp_path)
    graphdef, state = nnx.split(model)
    devices = jax.local_devices()[:4]
    inputs = text_inputs(model_type, "base")  # batch 4: one sequence per device
    per_device = {k: v.reshape(len(devices), -1, v.shape[-1]) for k, v in inputs.items()}
    forward = jax.pmap(lambda state, batch: nnx.merge(graphdef, state)(**batch).logits)
    logits = forward(flaxauto.sharding.replicate(state, devices), per_device)
    expected = run_torch(reference_model, inputs).logits
    assert max_diff(np.asarray(logits).reshape(expected.shape), expected) <= 1e-4


def test_readme_table_matches_the_registry():
    text = README.read_text()
    table = re.search(r"<!-- supported:start -->\n(.*?)<!-- supported:end -->", text, re.S)
    assert table, "README.md lost its supported-models table markers"
    assert table.group(1).strip() == supported_table().strip()


def supported_table() -> str:
    """The README table: each model type and the Auto classes it serves, in the order of
    AUTO_CLASSES (regenerate: `python tests/test_api.py`)."""
    lines = ["| model_type | Auto classes (AutoModel, AutoModelFor...) |", "|---|---|"]
    for model_type, tasks in flaxauto.supported().items():
        names = [
            name.removeprefix("AutoModelFor") if name != "AutoModel" else "AutoModel"
            for name in AUTO_CLASSES
            if registry.AUTO_CLASS_TASKS[name] in tasks
        ]
        lines.append(f"| `{model_type}` | {', '.join(names)} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(supported_table())
