"""Speech beyond the conformance suite: transformers' feature extractors feeding flaxauto (a numpy
chirp, no torch in the pipeline), the CTC loss against torch's ctc_loss in every setting, the
config variants the tiny references do not take (HuBERT's batch-normed positions, the old
weight_g / weight_v spelling), SpecAugment's given mask and the refusals."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file
from transformers.loss.loss_ctc import ForCTCLoss

import flaxauto
from flaxauto.heads import losses
from references import max_diff, run_torch, task_inputs, task_labels, torch_model

TOLERANCE = 1e-4
SAMPLING_RATE = 16000


def chirp(seconds: float, low: float = 200.0, high: float = 3000.0) -> np.ndarray:
    """A linear frequency sweep, float32 in [-0.5, 0.5]: speech-like energy across the band."""
    t = np.arange(int(seconds * SAMPLING_RATE)) / SAMPLING_RATE
    phase = 2 * np.pi * (low * t + (high - low) / (2 * seconds) * t * t)
    return (0.5 * np.sin(phase)).astype(np.float32)


@pytest.mark.parametrize("model_type", ["wav2vec2", "hubert"])
def test_feature_extractor_to_flaxauto_equals_transformers(model_type, tmp_path):
    """Two chirps of different lengths through Wav2Vec2FeatureExtractor (normalised, padded, with
    the attention mask) into the CTC model: logits and the greedy transcription ids equal torch's."""
    reference = torch_model(model_type, "ctc")
    reference.save_pretrained(tmp_path)
    extractor = transformers.Wav2Vec2FeatureExtractor(return_attention_mask=True)
    batch = extractor(
        [chirp(0.08), chirp(0.05, 400, 2000)],
        sampling_rate=SAMPLING_RATE,
        padding=True,
        return_tensors="np",
    )
    assert batch["attention_mask"][1].sum() < batch["attention_mask"].shape[1]
    model = flaxauto.AutoModelForCTC.from_pretrained(tmp_path)
    ours = model(**batch).logits
    theirs = run_torch(reference, dict(batch)).logits
    assert max_diff(ours, theirs) <= TOLERANCE
    assert np.array_equal(np.argmax(np.asarray(ours), -1), theirs.argmax(-1).numpy())


# -- the CTC loss -----------------------------------------------------------------------------


def _torch_ctc(logits, logit_lengths, labels, blank, reduction, zero_infinity):
    return ForCTCLoss(
        torch.as_tensor(logits), torch.as_tensor(labels), torch.as_tensor(logit_lengths),
        blank_token_id=blank, reduction=reduction, zero_infinity=zero_infinity,
    )  # fmt: skip


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("zero_infinity", [False, True])
def test_ctc_loss_equals_torch(reduction, zero_infinity):
    """Repeated labels (a blank between them is needed), -100 and blank labels amid a row (left
    out), an empty target, and a target too long for its frames (inf, or 0 with zero_infinity)."""
    rng = np.random.default_rng(0)
    frames, vocab, blank = 9, 7, 2
    logits = rng.standard_normal((5, frames, vocab)).astype(np.float32) * 2
    logit_lengths = np.array([9, 7, 9, 4, 6])
    labels = np.array(
        [
            [1, 1, 3, 4, -100, -100],  # a repeat: needs 5 frames
            [3, -100, 5, blank, 6, -100],  # ignored and blank labels in the middle
            [-100] * 6,  # nothing to transcribe
            [1, 3, 1, 3, 1, -100],  # 5 labels in 4 frames: impossible
            [4, 4, 4, -100, -100, -100],  # 3 repeats: 5 frames, fits in 6
        ]
    )
    ours = losses.ctc_loss(
        jax.numpy.asarray(logits), jax.numpy.asarray(logit_lengths), labels, blank_id=blank,
        reduction=reduction, zero_infinity=zero_infinity,
    )  # fmt: skip
    theirs = _torch_ctc(logits, logit_lengths, labels, blank, reduction, zero_infinity).numpy()
    ours = np.asarray(ours)
    assert np.array_equal(np.isinf(ours), np.isinf(theirs))
    finite = np.isfinite(theirs)
    assert np.allclose(ours[finite], theirs[finite], atol=1e-4, rtol=1e-5)


def test_ctc_loss_gradient_equals_torch():
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((3, 8, 6)).astype(np.float32)
    lengths, labels = (
        np.array([8, 6, 7]),
        np.array([[1, 2, 2, 3], [4, 5, -100, -100], [1, 1, 1, 1]]),
    )
    grad = jax.grad(lambda x: losses.ctc_loss(x, jax.numpy.asarray(lengths), labels, blank_id=0))(
        jax.numpy.asarray(logits)
    )
    tensor = torch.as_tensor(logits).requires_grad_(True)
    _torch_ctc(tensor, lengths, labels, 0, "mean", False).backward()
    assert max_diff(grad, tensor.grad) <= 1e-5


# -- variants and checkpoint spellings ----------------------------------------------------------


def test_hubert_batch_normed_positions(tmp_path):
    """conv_pos_batch_norm: a BatchNorm before a plain (not weight-normed) positional conv."""
    reference = torch_model("hubert", "ctc", conv_pos_batch_norm=True)
    reference.save_pretrained(tmp_path)
    model = flaxauto.AutoModelForCTC.from_pretrained(tmp_path)
    inputs = task_inputs("hubert", "ctc", config=reference.config)
    labels = task_labels(reference, "ctc", inputs)
    ours, theirs = model(**inputs, **labels), run_torch(reference, {**inputs, **labels})
    assert max_diff(ours.logits, theirs.logits) <= TOLERANCE
    assert max_diff(ours.loss, theirs.loss) <= TOLERANCE


def test_weight_norm_loads_from_weight_g_and_weight_v(tmp_path):
    """Checkpoints written before torch's parametrizations spell the positional conv's weight
    norm weight_g / weight_v; they load to the same numbers (and save in the new spelling)."""
    reference = torch_model("wav2vec2", "base")
    reference.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    old = {
        name.replace("parametrizations.weight.original0", "weight_g").replace(
            "parametrizations.weight.original1", "weight_v"
        ): value
        for name, value in tensors.items()
    }
    assert old.keys() != tensors.keys()
    save_file(old, tmp_path / "model.safetensors", metadata={"format": "pt"})
    model, info = flaxauto.AutoModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    inputs = task_inputs("wav2vec2", "base", config=reference.config)
    assert max_diff(model(**inputs).last_hidden_state, run_torch(reference, inputs)[0]) <= TOLERANCE
    model.save_pretrained(tmp_path / "again")
    assert set(load_file(tmp_path / "again" / "model.safetensors")) == set(tensors)


def test_given_spec_augment_mask_equals_transformers(tmp_path):
    """mask_time_indices puts the learned masked_spec_embed in those frames (no randomness)."""
    reference = torch_model("wav2vec2", "base")
    inputs = task_inputs("wav2vec2", "base", config=reference.config)
    frames = run_torch(reference, inputs).last_hidden_state.shape[1]
    mask = np.random.default_rng(2).random((len(inputs["input_values"]), frames)) < 0.3
    theirs = run_torch(reference, {**inputs, "mask_time_indices": mask}).last_hidden_state
    reference.save_pretrained(tmp_path)
    model = flaxauto.AutoModel.from_pretrained(tmp_path)
    ours = model(**inputs, mask_time_indices=mask).last_hidden_state
    assert max_diff(ours, theirs) <= TOLERANCE


def test_training_with_random_augmentation_is_refused(tmp_path):
    """SpecAugment and LayerDrop draw at random in training; flaxauto refuses rather than skip
    them, and trains once they are off."""
    reference = torch_model("wav2vec2", "audio-classification", layerdrop=0.1, mask_time_prob=0.05)
    reference.save_pretrained(tmp_path)
    inputs = task_inputs("wav2vec2", "audio-classification", config=reference.config)
    model = flaxauto.AutoModelForAudioClassification.from_pretrained(tmp_path)
    model.train()
    with pytest.raises(NotImplementedError, match="mask_time_prob=0.05, layerdrop=0.1"):
        model(**inputs)
    quiet = flaxauto.AutoModelForAudioClassification.from_pretrained(
        tmp_path, mask_time_prob=0.0, layerdrop=0.0
    )
    quiet.train()
    assert np.isfinite(np.asarray(quiet(**inputs).logits)).all()


@pytest.mark.parametrize(
    "setting",
    [{"add_adapter": True}, {"feat_extract_norm": "batch"}, {"ctc_loss_reduction": "max"}],
    ids=lambda s: next(iter(s)),
)
def test_unimplemented_settings_are_refused_naming_them(setting, tmp_path):
    reference = torch_model("wav2vec2", "base")
    reference.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, **setting}))
    ((name, value),) = setting.items()
    with pytest.raises(NotImplementedError, match=f"{name}={value!r}"):
        flaxauto.AutoModelForCTC.from_pretrained(tmp_path)
