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
    auto_class = getattr(flaxauto, flaxauto.registry.TASK_AUTO_CLASSES[task])
    return auto_class.from_pretrained(directory)


def long_inputs(length: int, batch: int = 2, vocab: int = 99) -> dict:
    """Unpadded [B, length] ids, for positions past max_position_embeddings."""
    ids = np.random.default_rng(5).integers(3, vocab, size=(batch, length))
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


#: With the default initializer_range (0.02) the tiny model's attention is nearly uniform, and
#: dropping a rope setting (yarn's attention factor, longrope's switch) moves its logits by only
#: about 1e-4; ten times larger weights make positions matter (by about 1 there).
SHARP = 0.2

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
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8},
    "yarn-mscale": {
        "rope_type": "yarn",
        "factor": 2.0,
        "original_max_position_embeddings": 8,
        "mscale": 2.0,
        "mscale_all_dim": 0.5,
        "beta_fast": 16,
        "beta_slow": 2,
        "truncate": False,
    },
    # head_dim 16: 8 factors each; positions 0..23 pass the original 8, so the long ones apply
    "longrope": {
        "rope_type": "longrope",
        "short_factor": [1.0, 1.1, 1.2, 1.5, 2.0, 2.5, 3.0, 4.0],
        "long_factor": [1.0, 1.3, 1.9, 2.7, 3.6, 5.0, 7.0, 9.0],
        "original_max_position_embeddings": 8,
    },
}


def rope_pair(variant: str, directory):
    """A tiny Llama causal LM with ROPE_VARIANTS[variant] (trained length 16), and flaxauto's."""
    params = {"rope_theta": 10000.0, **ROPE_VARIANTS[variant]}
    reference = torch_model(
        "llama", "causal-lm", max_position_embeddings=16, rope_parameters=params,
        initializer_range=SHARP,
    )  # fmt: skip
    return reference, load_like(reference, "causal-lm", directory)


@pytest.mark.parametrize("variant", sorted(ROPE_VARIANTS))
def test_rope_scaling_matches_transformers(variant, tmp_path):
    # 24 positions run past max_position_embeddings=16, where dynamic NTK starts stretching,
    # and past the original 8, where longrope takes its long factors; 6 stay within both
    reference, model = rope_pair(variant, tmp_path)
    for length in (24, 6):
        inputs = long_inputs(length)
        expected = run_torch(reference, inputs).logits
        assert max_diff(model(**inputs).logits, expected) <= TOLERANCE, length


def test_legacy_rope_scaling_key_is_read(tmp_path):
    reference = torch_model("llama", "base", rope_scaling={"type": "linear", "factor": 4.0})
    assert reference.config.rope_parameters["rope_type"] == "linear"
    model = load_like(reference, "base", tmp_path)
    inputs = long_inputs(12)
    expected = run_torch(reference, inputs).last_hidden_state
    assert max_diff(model(**inputs).last_hidden_state, expected) <= TOLERANCE


@pytest.mark.parametrize("variant", ["dynamic", "longrope"])
def test_length_dependent_rope_generates_like_transformers(variant, tmp_path):
    """Dynamic NTK recomputes the frequencies from the longest position at every step; longrope
    switches to its long factors once the sequence passes the original context mid-generation."""
    reference, model = rope_pair(variant, tmp_path)
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
    ("llama", dict(rope_parameters={"rope_type": "proportional"}), "rope_type"),
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
