"""Declared inputs: what a model call and from_pretrained accept, convert, pass through and refuse.

Heads defined here (not built-in) exercise the mechanisms later families need: a head that builds
the backbone's inputs from the labels (as a seq2seq head shifts labels into decoder_input_ids), a
head that asks the backbone for all hidden states, one that reads an input the backbone does not
take, and one whose labels are a list of dicts (as detection's).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import flaxauto
from flaxauto import inputs as declared_inputs
from flaxauto import outputs, registry
from flaxauto.converters.errors import CheckpointError
from flaxauto.heads import Head
from flaxauto.models.bert import BertModel
from references import max_diff, run_torch, text_inputs, tiny_config, torch_model

TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def bert_classifier(tmp_path_factory):
    """(PyTorch BertForSequenceClassification, its checkpoint folder, the flaxauto model)."""
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
    return reference, flaxauto.AutoModelForCausalLM.from_pretrained(directory)


# --- keywords nobody declared -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("keyword", "value", "hint"),
    [
        ("train", True, "model.train()"),
        ("deterministic", False, "model.train()"),
        ("dropout_rng", jax.random.key(0), "RNG streams"),
        ("params", {}, "nnx.split"),
        ("attention_maks", np.ones((4, 9), np.int64), "did you mean 'attention_mask'"),
    ],
)
def test_a_keyword_nobody_declares_is_a_type_error_naming_it(bert_classifier, keyword, value, hint):
    _, _, model = bert_classifier
    batch = text_inputs("bert", "sequence-classification")
    with pytest.raises(TypeError, match=f"'{keyword}'") as error:
        model(**batch, **{keyword: value})
    assert hint in str(error.value)


def test_decoders_and_bare_backbones_refuse_undeclared_keywords(gpt2_lm, tmp_path):
    _, model = gpt2_lm
    batch = text_inputs("gpt2", "causal-lm")
    with pytest.raises(TypeError, match="'token_type_idz'.*did you mean 'token_type_ids'"):
        model(**batch, token_type_idz=batch["input_ids"])
    base = flaxauto.AutoModel.from_config(tiny_config("bert"))
    with pytest.raises(TypeError, match="'labels'.*BertModel"):
        base(**text_inputs("bert", "base"), labels=np.zeros(4, np.int64))


@pytest.mark.parametrize(
    ("keyword", "value", "message"),
    [
        ("head_mask", np.ones((2, 4)), "head_mask= is not implemented"),
        ("cross_attn_head_mask", np.ones((2, 4)), "cross_attn_head_mask= is not implemented"),
        ("decoder_head_mask", np.ones((2, 4)), "decoder_head_mask= is not implemented"),
        ("past_key_values", (), "past_key_values=.*cache="),
        ("encoder_hidden_states", np.ones((4, 9, 32)), "encoder_hidden_states="),
        ("return_dict", False, "return_dict=False"),
    ],
)
def test_transformers_keywords_flaxauto_lacks_are_not_implemented(
    bert_classifier, keyword, value, message
):
    _, _, model = bert_classifier
    with pytest.raises(NotImplementedError, match=message):
        model(**text_inputs("bert", "sequence-classification"), **{keyword: value})


def test_use_cache_true_on_a_decoder_without_a_cache_names_the_flaxauto_way(gpt2_lm):
    _, model = gpt2_lm
    batch = text_inputs("gpt2", "causal-lm")
    with pytest.raises(NotImplementedError, match=r"use_cache=True.*model\.init_cache"):
        model(**batch, use_cache=True)
    cache = model.init_cache(batch["input_ids"].shape[0], 16)
    assert model(**batch, use_cache=True, cache=cache).cache is not None


def test_harmless_transformers_keywords_change_nothing(bert_classifier, gpt2_lm):
    reference, _, model = bert_classifier
    batch = text_inputs("bert", "sequence-classification")
    plain = model(**batch).logits
    assert max_diff(plain, run_torch(reference, batch).logits) <= TOLERANCE
    for harmless in [{"return_dict": True}, {"return_dict": None}, {"use_cache": False}]:
        assert np.array_equal(model(**batch, **harmless).logits, plain)
    # an encoder has no cache: transformers ignores use_cache=True there, and so does flaxauto
    assert np.array_equal(model(**batch, use_cache=True).logits, plain)

    reference, model = gpt2_lm
    batch = text_inputs("gpt2", "causal-lm")
    plain = model(**batch).logits
    keep = batch["attention_mask"][..., None] == 1  # left padding: compare real tokens
    expected = run_torch(reference, batch).logits.numpy()
    assert max_diff(np.where(keep, plain, 0), np.where(keep, expected, 0)) <= TOLERANCE
    assert np.array_equal(model(**batch, use_cache=False, return_dict=True).logits, plain)


# --- arrays, flags and pytrees ------------------------------------------------------------------


def test_python_lists_are_arrays(bert_classifier):
    reference, _, model = bert_classifier
    batch = text_inputs("bert", "sequence-classification")
    labels = np.array([0, 2, 1, 2])
    expected = run_torch(reference, {**batch, "labels": labels})
    out = model(**{k: v.tolist() for k, v in batch.items()}, labels=labels.tolist())
    assert max_diff(out.logits, expected.logits) <= TOLERANCE
    assert max_diff(out.loss, expected.loss) <= TOLERANCE


def test_the_main_input_may_come_first_but_only_once(bert_classifier):
    _, _, model = bert_classifier
    batch = text_inputs("bert", "sequence-classification")
    ids = batch.pop("input_ids")
    assert np.array_equal(model(ids, **batch).logits, model(input_ids=ids, **batch).logits)
    with pytest.raises(TypeError, match="input_ids both by position and by name"):
        model(ids, input_ids=ids, **batch)


def test_flags_are_static_bools(bert_classifier):
    reference, _, model = bert_classifier
    batch = text_inputs("bert", "sequence-classification")
    with pytest.raises(TypeError, match="output_hidden_states is a static flag"):
        model(**batch, output_hidden_states=jnp.array(True))
    with pytest.raises(NotImplementedError, match=r"output_hidden_states=\[-1\]: selecting"):
        model(**batch, output_hidden_states=[-1])
    expected = run_torch(reference, batch, output_hidden_states=True).hidden_states
    hidden = jax.jit(lambda m, x: m(**x, output_hidden_states=np.bool_(True)).hidden_states)(
        model, batch
    )
    assert len(hidden) == len(expected) == 3
    pairs = zip(hidden, expected, strict=True)
    assert max(max_diff(ours, theirs) for ours, theirs in pairs) <= TOLERANCE


def test_flags_default_to_the_config_as_in_transformers(tmp_path):
    reference = torch_model("bert", "base", output_hidden_states=True, output_attentions=True)
    reference.save_pretrained(tmp_path)
    model = flaxauto.AutoModel.from_pretrained(tmp_path)
    batch = text_inputs("bert", "base")
    expected, out = run_torch(reference, batch), model(**batch)
    for field in ("hidden_states", "attentions"):
        pairs = zip(getattr(out, field), getattr(expected, field), strict=True)
        assert max(max_diff(ours, theirs) for ours, theirs in pairs) <= TOLERANCE
    # passed, even as None (as transformers 5 reads it), a flag no longer follows the config
    off = dict(output_hidden_states=False, output_attentions=None)
    expected, out = run_torch(reference, batch, **off), model(**batch, **off)
    assert expected.hidden_states is None and out.hidden_states is None
    assert expected.attentions is None and out.attentions is None


def test_to_array_converts_arrays_and_numbers_and_nothing_else():
    detection_labels = [{"class_labels": np.array([1]), "boxes": np.zeros((1, 4))}]
    features = outputs.BaseModelOutput(last_hidden_state=np.zeros((1, 2, 3)))
    for untouched in (None, True, detection_labels, features, "text", []):
        assert declared_inputs.to_array(untouched) is untouched
    for value in (np.ones((2, 3)), [[1, 2], [3, 4]], (1.5, 2.5), 3, np.int64(4)):
        converted = declared_inputs.to_array(value)
        assert isinstance(converted, jax.Array)
        assert np.array_equal(converted, np.asarray(value))


def test_backbones_declare_keyword_only_inputs_and_flags():
    for model_type in flaxauto.supported():
        family, _ = registry.lookup(model_type, "base")
        declared = declared_inputs.backbone_inputs(family.backbone)
        assert family.main_input_name in declared.data
        assert declared.flags["output_hidden_states"] is False
        assert declared.flags["output_attentions"] is False

    class TakesAnything(BertModel):
        def __call__(self, *, input_ids=None, **flags):
            raise AssertionError("never called")

    with pytest.raises(TypeError, match=r"TakesAnything.__call__ takes \*\*flags"):
        declared_inputs.backbone_inputs(TakesAnything)


# --- heads that declare more --------------------------------------------------------------------

SEEN: list = []  # what DetectionLikeHead received


class ShiftLabelsHead(Head):
    """As a seq2seq head builds decoder_input_ids: input_ids are the labels shifted right, after a
    start token (pad_token_id), unless given. Returns the backbone's output."""

    def __init__(self, config, precision, rngs):
        self.start = config.pad_token_id

    def prepare_inputs(self, inputs, labels):
        if inputs.get("input_ids") is None and "labels" in labels:
            target = labels["labels"]  # [B, T]
            start = jnp.full((target.shape[0], 1), self.start, target.dtype)
            inputs = {**inputs, "input_ids": jnp.concatenate([start, target[:, :-1]], axis=1)}
        return inputs

    def __call__(self, features, *, backbone, inputs, labels=None):
        return features


class LayerMeanHead(Head):
    """The mean over all hidden states (embeddings and every layer): a weighted layer sum with
    equal weights, which needs them whatever the caller asks."""

    def __init__(self, config, precision, rngs):
        pass

    def backbone_flags(self):
        return {"output_hidden_states": True}

    def __call__(self, features, *, backbone, inputs, labels=None):
        return outputs.TokenClassifierOutput(
            logits=jnp.mean(jnp.stack(features.hidden_states), axis=0)  # [B, T, E]
        )


class WeightedPoolHead(Head):
    """Pools tokens by `token_weights` [B, T], an input the backbone does not take."""

    input_names = ("token_weights",)

    def __init__(self, config, precision, rngs):
        pass

    def __call__(self, features, *, backbone, inputs, labels=None):
        weights = inputs["token_weights"][..., None]  # [B, T, 1]
        pooled = jnp.sum(features.last_hidden_state * weights, axis=1)  # [B, E]
        return outputs.SequenceClassifierOutput(logits=pooled)


class DetectionLikeHead(Head):
    def __init__(self, config, precision, rngs):
        pass

    def __call__(self, features, *, backbone, inputs, labels=None):
        SEEN.append(labels)
        return features


TOY = "toy-inputs-bert"


@pytest.fixture(scope="module")
def toy_checkpoint(tmp_path_factory):
    """A BERT checkpoint under a model_type served by the heads above."""

    class ToyConfig(transformers.BertConfig):
        model_type = TOY

    flaxauto.register(
        model_types=(TOY,),
        backbone=BertModel,
        base_model_prefix="bert",
        heads={
            "seq2seq-lm": flaxauto.HeadSpec(ShiftLabelsHead),
            "token-classification": flaxauto.HeadSpec(LayerMeanHead),
            "sequence-classification": flaxauto.HeadSpec(WeightedPoolHead),
            "object-detection": flaxauto.HeadSpec(DetectionLikeHead),
        },
        config_class=ToyConfig,
    )
    reference = torch_model("bert", "base")
    directory = tmp_path_factory.mktemp("toy")
    reference.save_pretrained(directory)
    config = (directory / "config.json").read_text().replace('"bert"', f'"{TOY}"')
    (directory / "config.json").write_text(config)
    yield reference, directory
    registry._FAMILIES.pop(TOY, None)  # keep the registry (and README table) to built-ins


def test_a_head_builds_backbone_inputs_from_the_labels(toy_checkpoint):
    reference, directory = toy_checkpoint
    model = flaxauto.AutoModelForSeq2SeqLM.from_pretrained(directory)
    batch = text_inputs("bert", "base")
    labels = batch["input_ids"]
    shifted = np.concatenate([np.zeros_like(labels[:, :1]), labels[:, :-1]], axis=1)
    expected = run_torch(reference, {"input_ids": shifted}).last_hidden_state
    assert max_diff(model(labels=labels).last_hidden_state, expected) <= TOLERANCE
    # given input_ids, the labels do not replace them
    expected = run_torch(reference, {"input_ids": labels}).last_hidden_state
    assert max_diff(model(input_ids=labels, labels=labels).last_hidden_state, expected) <= TOLERANCE


def test_a_head_asks_the_backbone_for_flags(toy_checkpoint):
    reference, directory = toy_checkpoint
    model = flaxauto.AutoModelForTokenClassification.from_pretrained(directory)
    batch = text_inputs("bert", "base")
    hidden = run_torch(reference, batch, output_hidden_states=True).hidden_states
    expected = torch.stack(hidden).mean(0)
    for asked in ({}, {"output_hidden_states": False}):  # the head's need wins
        assert max_diff(model(**batch, **asked).logits, expected) <= TOLERANCE


def test_a_head_reads_an_input_the_backbone_does_not_take(toy_checkpoint):
    reference, directory = toy_checkpoint
    model = flaxauto.AutoModelForSequenceClassification.from_pretrained(directory)
    batch = text_inputs("bert", "base")
    weights = np.random.default_rng(0).random(batch["input_ids"].shape).astype(np.float32)
    hidden = run_torch(reference, batch).last_hidden_state
    expected = (hidden * torch.as_tensor(weights)[..., None]).sum(1)
    out = jax.jit(lambda m, x: m(**x).logits)(model, {**batch, "token_weights": weights.tolist()})
    assert max_diff(out, expected) <= TOLERANCE


def test_labels_as_a_list_of_dicts_reach_the_head_untouched(toy_checkpoint):
    _, directory = toy_checkpoint
    model = flaxauto.AutoModelForObjectDetection.from_pretrained(directory)
    labels = [{"class_labels": np.array([1, 2]), "boxes": np.ones((2, 4))}] * 4
    SEEN.clear()
    model(**text_inputs("bert", "base"), labels=labels)
    assert len(SEEN) == 1 and SEEN[0] is labels


# --- from_pretrained and from_config keywords ---------------------------------------------------


@pytest.mark.parametrize("keyword", ["num_label", "scan_layer", "output_hidden_state"])
def test_from_pretrained_refuses_keywords_nobody_uses(bert_classifier, keyword):
    _, directory, _ = bert_classifier
    with pytest.raises(TypeError, match=f"'{keyword}'"):
        flaxauto.AutoModelForSequenceClassification.from_pretrained(directory, **{keyword: 3})


def test_from_config_refuses_keywords_nobody_uses():
    with pytest.raises(TypeError, match="num_labels"):
        flaxauto.AutoModel.from_config(tiny_config("bert"), num_labels=3)


def test_config_overrides_still_apply(bert_classifier):
    reference, directory, _ = bert_classifier
    id2label = {0: "red", 1: "green", 2: "blue"}
    model = flaxauto.AutoModelForSequenceClassification.from_pretrained(
        directory, problem_type="regression", id2label=id2label
    )
    assert model.config.id2label == id2label and model.config.num_labels == 3
    batch = text_inputs("bert", "sequence-classification")
    labels = np.random.default_rng(0).random((4, 3)).astype(np.float32)
    reference.config.problem_type = "regression"
    try:
        expected = run_torch(reference, {**batch, "labels": labels}).loss
    finally:
        reference.config.problem_type = None
    # without the override, float labels would make it a multi-label loss
    assert max_diff(model(**batch, labels=labels).loss, expected) <= TOLERANCE

    base = flaxauto.AutoModelForSequenceClassification.from_pretrained(
        directory, num_labels=5, ignore_mismatched_sizes=True
    )
    assert base(**batch).logits.shape == (4, 5)


@pytest.mark.parametrize(
    ("keyword", "value", "instead"),
    [
        ("torch_dtype", "float16", "param_dtype="),
        ("device_map", "auto", "mesh="),
        ("trust_remote_code", True, "no code"),
        ("attn_implementation", "flash_attention_2", "supported"),
        ("quantization_config", {"load_in_8bit": True}, "quantized"),
    ],
)
def test_transformers_loading_keywords_flaxauto_lacks(bert_classifier, keyword, value, instead):
    _, directory, _ = bert_classifier
    with pytest.raises(NotImplementedError, match=f"{keyword}=.*{instead}"):
        flaxauto.AutoModel.from_pretrained(directory, **{keyword: value})


def test_transformers_loading_keywords_flaxauto_honours(bert_classifier):
    reference, directory, _ = bert_classifier
    model = flaxauto.AutoModelForSequenceClassification.from_pretrained(
        directory, trust_remote_code=False, low_cpu_mem_usage=True, attn_implementation="eager"
    )
    batch = text_inputs("bert", "sequence-classification")
    assert max_diff(model(**batch).logits, run_torch(reference, batch).logits) <= TOLERANCE


@pytest.mark.parametrize("max_shard_size", [None, "20KB"])
def test_subfolder_and_variant(bert_classifier, tmp_path, max_shard_size):
    reference, _, _ = bert_classifier
    shards = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    reference.save_pretrained(tmp_path / "sub", variant="v2", **shards)
    load = flaxauto.AutoModelForSequenceClassification.from_pretrained
    model = load(tmp_path, subfolder="sub", variant="v2")
    batch = text_inputs("bert", "sequence-classification")
    assert max_diff(model(**batch).logits, run_torch(reference, batch).logits) <= TOLERANCE
    with pytest.raises(CheckpointError, match=r"model\.safetensors, "):
        load(tmp_path, subfolder="sub")  # as transformers, no fallback between variants
    with pytest.raises(CheckpointError, match="no subfolder 'other'"):
        load(tmp_path, subfolder="other", variant="v2")
