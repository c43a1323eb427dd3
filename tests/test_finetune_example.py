"""examples/finetune.py on a tiny model: the loss falls, the saved model loads in transformers
with flaxauto's outputs, and a run interrupted at a checkpoint resumes to the same weights as
one that was not (dropout off, so the steps are deterministic)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import flaxauto
from references import max_diff, run_torch, torch_model

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "finetune.py"


def _example():
    spec = importlib.util.spec_from_file_location("finetune_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    model = torch_model("bert", "sequence-classification", hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, num_labels=2)  # fmt: skip
    model.save_pretrained(root / "base")
    rng = np.random.default_rng(0)
    lines = []
    for _ in range(64):  # label: does token 7 occur? learnable in a few steps
        ids = rng.integers(10, 99, size=int(rng.integers(4, 9))).tolist()
        label = int(rng.integers(0, 2))
        if label:
            ids[int(rng.integers(1, len(ids)))] = 7
        lines.append(json.dumps({"input_ids": [2, *ids], "label": label}))
    (root / "train.jsonl").write_text("\n".join(lines[:48]) + "\n")
    (root / "eval.jsonl").write_text("\n".join(lines[48:]) + "\n")
    return root, model


def _args(root, output, steps, **extra):
    args = [
        "--model", str(root / "base"), "--task", "sequence-classification",
        "--train", str(root / "train.jsonl"), "--eval", str(root / "eval.jsonl"),
        "--output", str(output), "--steps", str(steps), "--batch-size", "8",
        "--accumulate", "2", "--learning-rate", "3e-3", "--warmup-steps", "2",
        "--no-progress",
    ]  # fmt: skip
    for key, value in extra.items():
        args += [f"--{key.replace('_', '-')}"] + ([] if value is True else [str(value)])
    return args


def test_loss_falls_and_the_model_loads_in_transformers(setup, tmp_path):
    root, reference = setup
    history = _example().main(_args(root, tmp_path / "out", 12, bf16=True))
    losses = history["loss"]
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3]), losses
    assert history["eval"] and "accuracy" in history["eval"][-1]
    loaded = type(reference).from_pretrained(tmp_path / "out").eval()
    ours = flaxauto.AutoModelForSequenceClassification.from_pretrained(tmp_path / "out")
    ids = np.asarray([[2, 11, 7, 40, 0], [2, 30, 31, 32, 33]])
    inputs = {"input_ids": ids, "attention_mask": (ids != 0).astype(np.int64)}
    assert max_diff(ours(**inputs).logits, run_torch(loaded, inputs).logits) <= 1e-4
    trained = dict(loaded.named_parameters())
    assert not torch.equal(trained["classifier.weight"], reference.classifier.weight)


def test_resumes_from_its_orbax_checkpoint(setup, tmp_path):
    root, _ = setup
    example = _example()
    straight = example.main(_args(root, tmp_path / "straight", 6, decay_steps=6))
    example.main(_args(root, tmp_path / "resumed", 4, save_every=2, decay_steps=6))
    resumed = example.main(_args(root, tmp_path / "resumed", 6, decay_steps=6))
    assert resumed["resumed_from"] == 4
    np.testing.assert_allclose(resumed["loss"], straight["loss"][4:], rtol=1e-5)
    a = flaxauto.AutoModelForSequenceClassification.from_pretrained(tmp_path / "straight")
    b = flaxauto.AutoModelForSequenceClassification.from_pretrained(tmp_path / "resumed")
    for x, y in zip(*(jax_leaves(m) for m in (a, b)), strict=True):
        np.testing.assert_allclose(x, y, atol=1e-6)


def jax_leaves(model):
    import jax
    from flax import nnx

    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]
