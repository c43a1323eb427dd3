"""Decoder config variants against transformers: rotary scaling, GPT-2's attention options, tied
and untied heads, last-token pooling rules, and the settings flaxauto refuses by name."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import flaxauto
from references import max_diff, run_torch, text_inputs, tiny_config, torch_model

TOLERANCE = 1e-4


def load_like(reference, task, directory):
    reference.save_pretrained(directory)
    auto_class = getattr(flaxauto, flaxauto.auto.TASK_AUTO_CLASSES[task])
    return auto_class.from_pretrained(directory)


def long_inputs(length: int, batch: int = 2, vocab: int = 99) -> dict:
    """Unpadded [B, length] ids, for positions past max_position_embeddings."""
    ids = np.random.default_rng(5).integers(3, vocab, size=(batch, length))
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


ROPE_VARIANTS = {
    "linear": {"rope_type": "linear", "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "factor": 3.0},
    "llama3": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8,
    },
}


@pytest.mark.parametrize("variant", sorted(ROPE_VARIANTS))
def test_rope_scaling_matches_transformers(variant, tmp_path):
    # positions run past max_position_embeddings=16, where dynamic NTK starts stretching
    params = {"rope_theta": 10000.0, **ROPE_VARIANTS[variant]}
    reference = torch_model(
        "llama", "causal-lm", max_position_embeddings=16, rope_parameters=params
    )
    model = load_like(reference, "causal-lm", tmp_path)
    inputs = long_inputs(24)
    expected = run_torch(reference, inputs).logits
    assert max_diff(model(**inputs).logits, expected) <= TOLERANCE


def test_legacy_rope_scaling_key_is_read(tmp_path):
    reference = torch_model("llama", "base", rope_scaling={"type": "linear", "factor": 4.0})
    assert reference.config.rope_parameters["rope_type"] == "linear"
    model = load_like(reference, "base", tmp_path)
    inputs = long_inputs(12)
    expected = run_torch(reference, inputs).last_hidden_state
    assert max_diff(model(**inputs).last_hidden_state, expected) <= TOLERANCE


def test_dynamic_rope_generation_grows_like_transformers(tmp_path):
    """Dynamic NTK recomputes the frequencies from the longest position at every step."""
    params = {"rope_theta": 10000.0, "rope_type": "dynamic", "factor": 2.0}
    reference = torch_model(
        "llama", "causal-lm", max_position_embeddings=16, rope_parameters=params
    )
    model = load_like(reference, "causal-lm", tmp_path)
    inputs = text_inputs("llama", "causal-lm")
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    with torch.no_grad():
        expected = reference.generate(
            torch.as_tensor(ids), attention_mask=torch.as_tensor(mask), max_new_tokens=32,
            do_sample=False, eos_token_id=None,
        ).numpy()  # fmt: skip
    ours = model.generate(ids, attention_mask=mask, max_new_tokens=32, eos_token_id=None)
    np.testing.assert_array_equal(np.asarray(ours), expected)


GPT2_OPTIONS = {
    "unscaled": dict(scale_attn_weights=False),
    "inverse-layer-scale": dict(scale_attn_by_inverse_layer_idx=True),
    "reorder-and-upcast": dict(reorder_and_upcast_attn=True),
    "untied": dict(tie_word_embeddings=False),
}


@pytest.mark.parametrize("option", sorted(GPT2_OPTIONS))
def test_gpt2_options_match_transformers(option, tmp_path):
    reference = torch_model("gpt2", "causal-lm", **GPT2_OPTIONS[option])
    model = load_like(reference, "causal-lm", tmp_path)
    inputs = text_inputs("gpt2", "causal-lm")
    expected = run_torch(reference, inputs).logits.numpy()
    real = inputs["attention_mask"].astype(bool)[..., None]
    assert max_diff(np.where(real, model(**inputs).logits, 0), np.where(real, expected, 0)) <= 1e-4
    if option == "untied":
        assert "lm_head.weight" in {k for k, _ in reference.named_parameters()}
        assert model.head.lm_head is not None


def test_last_token_pooling_without_pad_token(tmp_path):
    """transformers: no pad_token_id -> the last position, and only for a batch of one."""
    reference = torch_model("gpt2", "sequence-classification", pad_token_id=None)
    model = load_like(reference, "sequence-classification", tmp_path)
    inputs = long_inputs(7, batch=1)
    assert max_diff(model(**inputs).logits, run_torch(reference, inputs).logits) <= TOLERANCE
    batch = long_inputs(7, batch=2)
    for run in (lambda: run_torch(reference, batch), lambda: model(**batch)):
        with pytest.raises(ValueError, match="no padding token"):
            run()


def test_last_token_pooling_finds_the_last_non_pad_token_when_right_padded(tmp_path):
    reference = torch_model("llama", "sequence-classification")
    model = load_like(reference, "sequence-classification", tmp_path)
    inputs = text_inputs("bert", "base")  # right-padded with 0 = the decoders' pad_token_id
    inputs = {k: inputs[k] for k in ("input_ids", "attention_mask")}
    assert max_diff(model(**inputs).logits, run_torch(reference, inputs).logits) <= TOLERANCE


def test_causal_lm_loss_on_the_input_ids_as_labels(tmp_path):
    reference = torch_model("qwen2", "causal-lm")
    model = load_like(reference, "causal-lm", tmp_path)
    inputs = long_inputs(9)
    labels = {"labels": inputs["input_ids"]}
    expected = run_torch(reference, {**inputs, **labels}).loss
    assert max_diff(model(**inputs, **labels).loss, expected) <= TOLERANCE


REFUSED = [
    ("llama", dict(rope_parameters={"rope_type": "yarn", "factor": 2.0}), "rope_type"),
    ("llama", dict(rope_parameters={"rope_type": "default", "partial_rotary_factor": 0.5}),
     "partial_rotary_factor"),
    ("llama", dict(hidden_act="not-an-activation"), "hidden_act"),
    ("gpt2", dict(add_cross_attention=True), "add_cross_attention"),
    ("gpt2", dict(activation_function="not-an-activation"), "activation_function"),
]  # fmt: skip


@pytest.mark.parametrize("model_type, overrides, attribute", REFUSED)
def test_unimplemented_settings_are_refused_by_name(model_type, overrides, attribute):
    config = tiny_config(model_type)
    for name, value in overrides.items():
        setattr(config, name, value)
    with pytest.raises(NotImplementedError, match=attribute):
        flaxauto.AutoModel.from_config(config)


def test_scan_layers_refuses_layers_that_differ_by_index():
    config = tiny_config("gpt2", scale_attn_by_inverse_layer_idx=True)
    flaxauto.AutoModel.from_config(config)  # unrolled, each layer has its own scale
    with pytest.raises(NotImplementedError, match="scale_attn_by_inverse_layer_idx"):
        flaxauto.AutoModel.from_config(config, scan_layers=True)
