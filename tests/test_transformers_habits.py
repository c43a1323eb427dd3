"""What a transformers user types works: outputs indexed and unpacked as transformers' are,
past_key_values as the cache's other name, generate's ids straight into a tokenizer, and the
transformers 4 Flax keywords either accepted (from_pt=True) or refused with what to write instead.
Every number is compared with the live PyTorch model on the same weights."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers

import flaxauto
from flaxauto import outputs
from references import max_diff, run_torch, task_labels, text_inputs, torch_model

TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def bert_classifier(tmp_path_factory):
    reference = torch_model("bert", "sequence-classification")
    directory = tmp_path_factory.mktemp("bert-classifier")
    reference.save_pretrained(directory)
    model = flaxauto.AutoModelForSequenceClassification.from_pretrained(directory)
    return reference, directory, model


@pytest.fixture(scope="module")
def gpt2_lm(tmp_path_factory):
    reference = torch_model("gpt2", "causal-lm")
    directory = tmp_path_factory.mktemp("gpt2-lm")
    reference.save_pretrained(directory)
    return reference, directory, flaxauto.AutoModelForCausalLM.from_pretrained(directory)


def test_outputs_index_and_unpack_in_transformers_order(bert_classifier):
    reference, _, model = bert_classifier
    batch = text_inputs("bert", "sequence-classification")
    labels = task_labels(model, "sequence-classification", batch)
    flags = dict(output_hidden_states=True, output_attentions=True)
    ours, theirs = model(**batch, **labels, **flags), run_torch(reference, batch | labels, **flags)
    assert ours.keys() == list(theirs.keys())
    mine, want = ours.to_tuple(), theirs.to_tuple()
    assert len(mine) == len(want) == 4  # loss, logits, hidden_states, attentions
    for got, expected in zip(mine, want, strict=True):
        pairs = zip(got, expected, strict=True) if isinstance(got, tuple) else [(got, expected)]
        assert all(max_diff(a, b) <= TOLERANCE for a, b in pairs)
    assert max_diff(ours[0], theirs[0]) <= TOLERANCE and max_diff(ours[1], theirs[1]) <= TOLERANCE
    assert max_diff(ours[-1][0], theirs[-1][0]) <= TOLERANCE  # slices and negative indices
    loss, logits = ours[:2]
    assert max_diff(logits, theirs.logits) <= TOLERANCE
    plain = model(**batch)  # without labels, index 0 is the logits, as in transformers
    assert max_diff(plain[0], run_torch(reference, batch)[0]) <= TOLERANCE
    with pytest.raises(IndexError):
        plain[1]


def test_past_key_values_is_the_cache_in_and_out(gpt2_lm):
    reference, _, model = gpt2_lm
    ids = text_inputs("gpt2", "causal-lm")["input_ids"][:, :6]
    full = run_torch(reference, {"input_ids": ids}).logits  # [B, 6, V]
    cache = model.init_cache(ids.shape[0], 8)
    first = model(ids[:, :5], past_key_values=cache)
    assert first.past_key_values is first.cache is first["past_key_values"]
    assert first.to_tuple()[1] is first.cache  # (logits, past_key_values), as transformers
    second = model(ids[:, 5:], past_key_values=first.past_key_values)
    assert max_diff(first.logits, full[:, :5]) <= TOLERANCE
    assert max_diff(second.logits, full[:, 5:]) <= TOLERANCE
    with pytest.raises(TypeError, match="both past_key_values= and cache="):
        model(ids, past_key_values=cache, cache=cache)
    with pytest.raises(NotImplementedError, match="DynamicCache.*init_cache"):
        model(ids, past_key_values=transformers.DynamicCache())
    assert max_diff(model(ids, past_key_values=None).logits, full) <= TOLERANCE
    assert model(ids).past_key_values is None  # no cache in, none out
    with pytest.raises(AttributeError, match="carries no cache"):
        _ = outputs.SequenceClassifierOutput().past_key_values


def _word_tokenizer(vocab_size: int):
    """A tokenizer built here (no download): token i is the word f"w{i}"."""
    vocab = {f"w{i}": i for i in range(vocab_size)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="w3"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="w0", bos_token="w1", eos_token="w2", unk_token="w3"
    )


def test_generate_output_decodes_with_a_tokenizer_as_transformers_does(gpt2_lm):
    reference, _, model = gpt2_lm
    tokenizer = _word_tokenizer(model.config.vocab_size)
    prompt = np.array([[5, 17, 33, 8], [9, 40, 41, 12]], np.int64)
    settings = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        want = reference.generate(torch.as_tensor(prompt), **settings)
    ids = model.generate(prompt, **settings)
    assert tokenizer.batch_decode(ids) == tokenizer.batch_decode(want)
    assert tokenizer.decode(ids[0]) == tokenizer.decode(want[0])
    out = model.generate(prompt, return_dict_in_generate=True, **settings)
    assert tokenizer.batch_decode(out.sequences) == tokenizer.batch_decode(want)
    assert np.array_equal(out[0], want.numpy()) and np.array_equal(out["sequences"], ids)


def test_from_pt_is_accepted_with_one_note(gpt2_lm, caplog):
    reference, directory, _ = gpt2_lm
    batch = text_inputs("gpt2", "causal-lm")
    with caplog.at_level(logging.WARNING, logger="flaxauto"):
        for _ in range(2):
            model = flaxauto.AutoModelForCausalLM.from_pretrained(directory, from_pt=True)
    notes = [r for r in caplog.records if "from_pt=True is the default" in r.getMessage()]
    assert len(notes) <= 1  # once per process (an earlier test may have shown it already)
    assert max_diff(model(**batch).logits, run_torch(reference, batch).logits) <= TOLERANCE
    with pytest.raises(TypeError, match="from_pt='yes'"):
        flaxauto.AutoModelForCausalLM.from_pretrained(directory, from_pt="yes")


@pytest.mark.parametrize(
    ("keyword", "value", "instead"),
    [
        ("_do_init", False, r"nnx\.split\(model\)"),
        ("params", {"params": {}}, "carries its parameters"),
        ("dropout_rng", 0, r"seed=\) and model\.train\(\)"),
        ("train", True, r"model\.train\(\)"),
    ],
)
def test_transformers_4_flax_loading_keywords_say_what_to_write(gpt2_lm, keyword, value, instead):
    _, directory, _ = gpt2_lm
    with pytest.raises(NotImplementedError, match=f"{keyword}=.*{instead}"):
        flaxauto.AutoModelForCausalLM.from_pretrained(directory, **{keyword: value})
