"""Marian beyond the conformance suite: separate encoder and decoder tables with a decoder
vocabulary of its own, the sinusoidal tables transformers computes (loaded when present, computed
silently when absent, written only where transformers writes them), opus-mt's config keys, and
generation with opus-mt's generation settings (bad_words_ids [[pad]]) token-identical to
transformers'. Every number comes from a live transformers model built here."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors import safe_open

import flaxauto
from references import max_diff, run_torch, task_inputs, task_labels, torch_model

TOLERANCE = 1e-4
#: the decoder's vocabulary, apart from the encoder's 99
DECODER_VOCAB = 77
POSITIONS = ("encoder.embed_positions.weight", "decoder.embed_positions.weight")


def saved_keys(directory) -> set[str]:
    with safe_open(str(directory / "model.safetensors"), "np") as f:
        return set(f.keys())


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def unshared(request, tmp_path_factory):
    """(transformers MarianMTModel, its directory) with share_encoder_decoder_embeddings=False
    and decoder_vocab_size 77 != vocab_size 99; lm_head tied to the decoder's table or not."""
    reference = torch_model(
        "marian", "seq2seq-lm", share_encoder_decoder_embeddings=False,
        decoder_vocab_size=DECODER_VOCAB, tie_word_embeddings=request.param,
    )  # fmt: skip
    directory = tmp_path_factory.mktemp("marian-unshared")
    reference.save_pretrained(directory)
    return reference, directory


def test_unshared_tables_and_decoder_vocabulary_equal_transformers(unshared):
    reference, directory = unshared
    model = flaxauto.AutoModelForSeq2SeqLM.from_pretrained(directory)
    assert model.backbone.shared is None
    assert model.backbone.decoder.embed_tokens.embedding.shape == (DECODER_VOCAB, 32)
    inputs = task_inputs("marian", "seq2seq-lm", config=reference.config)
    batch = {**inputs, **task_labels(reference, "seq2seq-lm", inputs)}
    expected = run_torch(reference, batch)
    assert expected.logits.shape[-1] == DECODER_VOCAB
    graphdef, state = nnx.split(model)
    out = jax.jit(lambda state, batch: nnx.merge(graphdef, state)(**batch))(state, batch)
    assert max_diff(out.logits, expected.logits) <= TOLERANCE
    assert max_diff(out.loss, expected.loss) <= TOLERANCE
    assert max_diff(out.encoder_last_hidden_state, expected.encoder_last_hidden_state) <= TOLERANCE


def test_unshared_round_trip_is_bit_exact_and_saves_what_transformers_saves(unshared, tmp_path):
    reference, directory = unshared
    model = flaxauto.AutoModelForSeq2SeqLM.from_pretrained(directory)
    model.save_pretrained(tmp_path)
    assert saved_keys(tmp_path) == saved_keys(directory)
    reloaded, info = type(reference).from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    original = reference.state_dict()
    for name, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, original[name]), name


@pytest.mark.parametrize("task", ["base", "seq2seq-lm"])
def test_sinusoids_saved_where_transformers_saves_them(task, tmp_path):
    """MarianMTModel leaves its computed positions out of its files, MarianModel writes them:
    flaxauto writes the same keys, and loads either silently (no missing keys reported)."""
    reference = torch_model("marian", task)
    reference.save_pretrained(tmp_path / "theirs")
    auto_class = flaxauto.AutoModel if task == "base" else flaxauto.AutoModelForSeq2SeqLM
    model, info = auto_class.from_pretrained(tmp_path / "theirs", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    model.save_pretrained(tmp_path / "ours")
    assert saved_keys(tmp_path / "ours") == saved_keys(tmp_path / "theirs")
    prefix = "" if task == "base" else "model."
    carried = {prefix + name for name in POSITIONS} <= saved_keys(tmp_path / "ours")
    assert carried == (task == "base")
    # the table is computed (not loaded) for seq2seq-lm and equals transformers' computed one
    table = np.asarray(model.backbone.decoder.embed_positions.weight[...])
    expected = reference.state_dict()[prefix + POSITIONS[1]].numpy()
    np.testing.assert_array_equal(table, expected)


def test_position_tables_are_frozen_as_torch_freezes_them():
    """torch's MarianSinusoidalPositionalEmbedding has requires_grad=False: no optimiser moves it,
    and flaxauto keeps it out of nnx.Param (a Buffer), so training cannot change a table that
    save_pretrained would then drop."""
    reference = torch_model("marian", "seq2seq-lm")
    assert not reference.model.encoder.embed_positions.weight.requires_grad
    model = flaxauto.AutoModelForSeq2SeqLM.from_config(reference.config)
    params = nnx.to_flat_state(nnx.state(model, nnx.Param))
    assert not [path for path, _ in params if "embed_positions" in map(str, path)]


def test_decoder_inputs_embeds_are_scaled_as_transformers_scales_them(tmp_path):
    """Marian's (and Pegasus') decoder multiplies whatever embeddings it gets by embed_scale."""
    for model_type in ("marian", "pegasus"):
        reference = torch_model(model_type, "base")
        reference.save_pretrained(tmp_path / model_type)
        model = flaxauto.AutoModel.from_pretrained(tmp_path / model_type)
        inputs = task_inputs(model_type, "base", config=reference.config)
        decoder_ids = inputs.pop("decoder_input_ids")
        table = reference.get_input_embeddings().weight.detach().numpy()
        batch = {**inputs, "decoder_inputs_embeds": table[decoder_ids]}
        expected = run_torch(reference, batch)
        assert max_diff(model(**batch).last_hidden_state, expected.last_hidden_state) <= TOLERANCE


#: the keys opus-mt's config.json files carry (Helsinki-NLP/opus-mt-*), scaled down
OPUS_MT_KEYS = dict(
    activation_function="swish", add_bias_logits=False, add_final_layer_norm=False,
    bad_words_ids=[[1]], classif_dropout=0.0, classifier_dropout=0.0, normalize_before=False,
    normalize_embedding=False, static_position_embeddings=True, num_beams=4, max_length=20,
    share_encoder_decoder_embeddings=True, gradient_checkpointing=False, scale_embedding=True,
)  # fmt: skip


def _with_config_keys(tmp_path, **keys):
    reference = torch_model("marian", "seq2seq-lm")
    reference.save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | keys))
    return reference


def test_opus_mt_config_keys_load(tmp_path):
    reference = _with_config_keys(tmp_path, **OPUS_MT_KEYS)
    model = flaxauto.AutoModelForSeq2SeqLM.from_pretrained(tmp_path)
    inputs = task_inputs("marian", "seq2seq-lm", config=reference.config)
    assert max_diff(model(**inputs).logits, run_torch(reference, inputs).logits) <= TOLERANCE


@pytest.mark.parametrize(
    "keys,named",
    [
        (dict(normalize_before=True), "normalize_before"),
        (dict(static_position_embeddings=False), "static_position_embeddings"),
        (dict(decoder_vocab_size=DECODER_VOCAB), "decoder_vocab_size"),
    ],
)
def test_settings_marian_does_not_compute_are_refused_by_name(tmp_path, keys, named):
    _with_config_keys(tmp_path, **keys)
    with pytest.raises(NotImplementedError, match=named):
        flaxauto.AutoModelForSeq2SeqLM.from_pretrained(tmp_path)


#: Helsinki-NLP/opus-mt-*'s generation_config.json, max_length scaled to a tiny model
OPUS_MT_GENERATION = dict(
    bad_words_ids=[[1]], bos_token_id=0, decoder_start_token_id=1, eos_token_id=0,
    forced_eos_token_id=0, max_length=16, num_beams=4, pad_token_id=1,
)  # fmt: skip


@pytest.fixture(scope="module")
def opus_like(tmp_path_factory):
    """A tiny Marian whose final_logits_bias favours the pad token, so that opus-mt's
    bad_words_ids [[pad]] decides tokens, with opus-mt's generation_config.json beside it."""
    from transformers import GenerationConfig

    reference = torch_model("marian", "seq2seq-lm")
    with torch.no_grad():
        reference.final_logits_bias[0, reference.config.pad_token_id] += 6.0
    reference.generation_config = GenerationConfig(**OPUS_MT_GENERATION)
    directory = tmp_path_factory.mktemp("opus-like")
    reference.save_pretrained(directory)
    return reference, flaxauto.AutoModelForSeq2SeqLM.from_pretrained(directory)


def _generate_torch(reference, ids, mask, **settings):
    with torch.no_grad():
        return reference.generate(
            torch.as_tensor(ids), attention_mask=torch.as_tensor(mask), **settings
        ).numpy()


@pytest.mark.parametrize("settings", [{}, {"num_beams": 1}], ids=["beam-4", "greedy"])
def test_generation_with_opus_mt_settings_is_token_identical(opus_like, settings):
    """generate() with the checkpoint's generation_config.json (beam 4 as opus-mt, and greedy)
    gives transformers' tokens; bad_words_ids keeps the favoured pad token out of them."""
    reference, model = opus_like
    inputs = task_inputs("marian", "seq2seq-lm", seed=3)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    expected = _generate_torch(reference, ids, mask, **settings)
    ours = np.asarray(model.generate(ids, attention_mask=mask, **settings))
    np.testing.assert_array_equal(ours, expected)
    pad = reference.config.pad_token_id
    eos = reference.config.eos_token_id
    for row in ours[:, 1:]:  # after its eos a row is padded
        end = int(np.argmax(row == eos)) if np.any(row == eos) else len(row)
        assert pad not in row[:end], f"the banned pad token was generated: {row}"
    # the ban decides: without it both generate the favoured pad token
    unbanned = _generate_torch(reference, ids, mask, bad_words_ids=None, **settings)
    assert np.any(unbanned[:, 1:] == pad)
    ours_unbanned = np.asarray(model.generate(ids, attention_mask=mask, bad_words_ids=None,
                                              **settings))  # fmt: skip
    np.testing.assert_array_equal(ours_unbanned, unbanned)


def test_the_readme_translation_example_runs(tmp_path, monkeypatch):
    """README's Marian example (tokenizer built locally) runs as written."""
    import re

    from test_api import README

    block = re.search(
        r"<!-- marian-example:start -->\n```python\n(.*?)```\n<!-- marian-example:end -->",
        README.read_text(),
        re.S,
    )
    assert block, "README.md lost its Marian example markers"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(block.group(1), "README.md", "exec"), namespace)  # noqa: S102
    translated = namespace["translated"]
    assert translated.shape[0] == 2 and translated.shape[1] <= 12
    assert (translated[:, 0] == namespace["tokenizer"].pad_token_id).all()  # the start token
    pad = namespace["tokenizer"].pad_token_id
    for row in translated[:, 1:]:  # the banned pad appears only as padding after eos
        end = int(np.argmax(row == 0)) if np.any(row == 0) else len(row)
        assert pad not in row[:end]


def test_a_carried_position_table_loads_as_transformers_loads_it(tmp_path):
    """A checkpoint that carries its tables (MarianModel's files do) is read, not recomputed:
    a table changed in the file changes both models' outputs alike."""
    reference = torch_model("marian", "base")
    with torch.no_grad():
        reference.encoder.embed_positions.weight.mul_(1.5)
    reference.save_pretrained(tmp_path)
    reloaded = type(reference).from_pretrained(tmp_path).eval()
    assert torch.equal(
        reloaded.encoder.embed_positions.weight, reference.encoder.embed_positions.weight
    )
    model = flaxauto.AutoModel.from_pretrained(tmp_path)
    inputs = task_inputs("marian", "base", config=reference.config)
    expected = run_torch(reloaded, inputs)
    out = model(**inputs)
    assert max_diff(out.encoder_last_hidden_state, expected.encoder_last_hidden_state) <= TOLERANCE
    assert max_diff(out.last_hidden_state, expected.last_hidden_state) <= TOLERANCE
