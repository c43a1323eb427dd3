"""Whisper beyond the conformance suite: generate against transformers' WhisperForConditionalGeneration
.generate on a tiny random model (tests/references.py: initializer 0.25), with the decoder prompt
built from generation_config.json and language= / task=, suppress_tokens and begin_suppress_tokens;
the refusals (language detection, timestamps, long-form); WhisperFeatureExtractor from a numpy
chirp into flaxauto."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch
import transformers
from test_speech import SAMPLING_RATE, chirp

import flaxauto
from references import max_diff, run_torch, task_inputs, torch_model

#: A multilingual generation config in the shape of openai/whisper-*'s generation_config.json.
#: The no-timestamps token is the last id, so that no id of this vocabulary is a timestamp.
GENERATION = dict(
    decoder_start_token_id=3, pad_token_id=0, eos_token_id=2, bos_token_id=1,
    lang_to_id={"<|en|>": 90, "<|fr|>": 91}, task_to_id={"translate": 92, "transcribe": 93},
    no_timestamps_token_id=98, is_multilingual=True, suppress_tokens=[5, 18],
    begin_suppress_tokens=[2, 54], max_length=32,
)  # fmt: skip
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def whisper(tmp_path_factory):
    """(transformers model, flaxauto model, input_features [4, mel, frames])."""
    directory = tmp_path_factory.mktemp("whisper-generate")
    reference = torch_model("whisper", "speech-seq2seq")
    reference.generation_config = transformers.GenerationConfig(**GENERATION)
    reference.save_pretrained(directory)
    model = flaxauto.AutoModelForSpeechSeq2Seq.from_pretrained(directory)
    features = task_inputs("whisper", "speech-seq2seq", config=reference.config)["input_features"]
    return reference, model, features


def _torch_generate(reference, features, **settings):
    with torch.no_grad():
        return reference.generate(torch.as_tensor(features), **settings).numpy()


@pytest.mark.parametrize(
    "settings",
    [
        dict(language="en", task="transcribe"),
        dict(language="fr", task="translate", num_beams=3),
        dict(language=["en", "fr", "fr", "en"]),  # a language per row; the task defaults
    ],
    ids=["greedy", "beam-search", "per-row-language"],
)
def test_generate_is_token_identical_to_transformers(whisper, settings):
    """transformers' Whisper generate returns the continuation alone; flaxauto's returns the
    decoder prompt (start, language, task, no-timestamps) and the continuation, as its
    encoder-decoder generate does for every family."""
    reference, model, features = whisper
    theirs = _torch_generate(reference, features, max_new_tokens=NEW_TOKENS, **settings)
    ours = np.asarray(
        model.generate(None, input_features=features, max_new_tokens=NEW_TOKENS, **settings)
    )
    languages = settings["language"]
    languages = [languages] * len(features) if isinstance(languages, str) else languages
    task = settings.get("task", "transcribe")
    prompt = [
        [3, GENERATION["lang_to_id"][f"<|{language}|>"], GENERATION["task_to_id"][task], 98]
        for language in languages
    ]
    assert ours[:, :4].tolist() == prompt
    assert np.array_equal(ours[:, 4:], theirs)
    assert not np.isin(ours[:, 4:], GENERATION["suppress_tokens"]).any()
    assert not np.isin(ours[:, 4], GENERATION["begin_suppress_tokens"]).any()


def test_sampling_keeps_the_prompt_and_the_suppressions(whisper):
    _, model, features = whisper
    key = jax.random.key(0)
    first, again = (
        np.asarray(
            model.generate(
                None, input_features=features, language="en", do_sample=True, temperature=1.5,
                max_new_tokens=NEW_TOKENS, key=key,
            )
        )
        for _ in range(2)
    )  # fmt: skip
    assert np.array_equal(first, again)  # seeded by the key
    assert (first[:, :4] == [3, 90, 93, 98]).all()
    assert not np.isin(first[:, 4:], GENERATION["suppress_tokens"]).any()


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(), "language detection"),
        (dict(language="en", return_timestamps=True), "return_timestamps=True"),
    ],
    ids=["language-detection", "timestamps"],
)
def test_unimplemented_generation_is_refused_naming_it(whisper, settings, message):
    _, model, features = whisper
    with pytest.raises(NotImplementedError, match=message):
        model.generate(None, input_features=features, max_new_tokens=2, **settings)


def test_long_form_is_refused(whisper):
    _, model, features = whisper
    longer = np.concatenate([features, features], axis=-1)  # 60 s of features
    with pytest.raises(NotImplementedError, match="long-form"):
        model.generate(None, input_features=longer, language="en", max_new_tokens=2)


def test_feature_extractor_to_flaxauto_equals_transformers(tmp_path):
    """Two chirps through WhisperFeatureExtractor (log-mel, padded to the window) into audio
    classification and speech-to-text: the same logits as transformers."""
    # a 1 s window (100 frames of 10 ms) instead of 30 s: 50 encoder positions
    window = dict(max_source_positions=50)
    config = torch_model("whisper", "base", **window).config
    extractor = transformers.WhisperFeatureExtractor(
        feature_size=config.num_mel_bins, chunk_length=1
    )
    batch = extractor(
        [chirp(0.4), chirp(0.7, 500, 4000)], sampling_rate=SAMPLING_RATE, return_tensors="np"
    )
    features = batch["input_features"]
    assert features.shape[-1] == 2 * config.max_source_positions
    for task, auto_class in (
        ("audio-classification", flaxauto.AutoModelForAudioClassification),
        ("speech-seq2seq", flaxauto.AutoModelForSpeechSeq2Seq),
    ):
        reference = torch_model("whisper", task, **window)
        reference.save_pretrained(tmp_path / task)
        model = auto_class.from_pretrained(tmp_path / task)
        inputs = {"input_features": features}
        if task == "speech-seq2seq":
            inputs["decoder_input_ids"] = np.array([[3, 90, 93, 98]] * len(features))
        assert max_diff(model(**inputs).logits, run_torch(reference, inputs).logits) <= 1e-4
