"""transformers 4 Flax checkpoints load, torch-free, into every family transformers 4 had Flax
classes for: flax_model.msgpack, its sharded form with an index, and model.safetensors saved with
`format: flax`. The fixtures were written by transformers 4's Flax classes (tests/
make_flax_fixtures.py says how); each is compared with its PyTorch twin (transformers 4's own
Flax -> PyTorch conversion of the same weights) run live by transformers 5."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import safetensors
import torch
import transformers

import flaxauto
from flaxauto.converters.files import resolve_checkpoint
from references import max_diff

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "flax"
TOLERANCE = 1e-4

#: family -> (task, the output field compared)
TASKS = {
    "bert": ("masked-lm", "logits"),
    "roberta": ("sequence-classification", "logits"),
    "xlm-roberta": ("token-classification", "logits"),
    "distilbert": ("sequence-classification", "logits"),
    "gpt2": ("causal-lm", "logits"),
    "llama": ("causal-lm", "logits"),
    "mistral": ("base", "last_hidden_state"),
}
FORMATS = ("msgpack", "sharded", "safetensors")


def _inputs(family: str) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 40, size=(2, 7))
    mask = np.ones_like(ids)
    if family not in {"gpt2", "llama", "mistral"}:
        mask[1, 5:] = 0  # a padded row: the mask must reach attention the same way
    return {"input_ids": ids, "attention_mask": mask}


@pytest.fixture(scope="module")
def twins():
    """family -> the transformers 5 PyTorch model on the PyTorch twin's weights."""
    return {}


def _twin(twins, family: str, task: str):
    if family not in twins:
        config = transformers.AutoConfig.from_pretrained(FIXTURES / family / "pytorch")
        config._attn_implementation = "eager"
        name = flaxauto.registry.transformers_class_name(config.model_type, task)
        twins[family] = getattr(transformers, name).from_pretrained(
            FIXTURES / family / "pytorch", config=config
        )
    return twins[family].eval()


@pytest.mark.parametrize("layout", FORMATS)
@pytest.mark.parametrize("family", list(TASKS))
def test_a_transformers_4_flax_checkpoint_gives_the_pytorch_numbers(twins, family, layout):
    task, field = TASKS[family]
    folder = FIXTURES / family / layout
    assert resolve_checkpoint(folder).format == (
        "safetensors" if layout == "safetensors" else "flax"
    )
    auto_class = getattr(flaxauto, flaxauto.registry.TASK_AUTO_CLASSES[task])
    model, info = auto_class.from_pretrained(folder, output_loading_info=True)
    assert not any(info.values()), info  # nothing missing, unexpected or re-initialised
    batch = _inputs(family)
    with torch.no_grad():
        want = _twin(twins, family, task)(**{k: torch.as_tensor(v) for k, v in batch.items()})
    got = model(**batch)
    keep = batch["attention_mask"].astype(bool)  # padded positions of token outputs may differ
    ours, theirs = np.asarray(got[field]), want[field].numpy()
    if ours.ndim == 3:
        ours, theirs = ours[keep], theirs[keep]
    assert max_diff(ours, theirs) <= TOLERANCE


def test_the_fixtures_are_what_transformers_4_flax_writes():
    for family in TASKS:
        with safetensors.safe_open(
            FIXTURES / family / "safetensors" / "model.safetensors", "np"
        ) as f:
            assert f.metadata() == {"format": "flax"}
            assert any(key.endswith((".kernel", ".embedding")) for key in f.keys())
        assert (FIXTURES / family / "sharded" / "flax_model.msgpack.index.json").is_file()
        assert len(list((FIXTURES / family / "sharded").glob("flax_model-*.msgpack"))) > 1


@pytest.mark.parametrize("layout", FORMATS)
def test_convert_turns_a_flax_checkpoint_into_the_pytorch_twin(tmp_path, layout):
    from flaxauto.cli import main

    family = "bert"
    argv = ["convert", str(FIXTURES / family / layout), str(tmp_path / "out"), "--no-progress"]
    assert main(argv) == 0
    converted = transformers.BertForMaskedLM.from_pretrained(tmp_path / "out").state_dict()
    twin = transformers.BertForMaskedLM.from_pretrained(FIXTURES / family / "pytorch").state_dict()
    assert converted.keys() == twin.keys()
    for key, value in twin.items():
        assert torch.equal(converted[key], value), key
