"""The video, speech and table pipelines answer as transformers' pipelines do on the same tiny
random checkpoints and inputs: labels and text identical, scores within 1e-4."""

from __future__ import annotations

import importlib
import json
import types

import numpy as np
import pytest
import transformers
from test_pipelines import assert_same_answers
from test_tapas import QUERIES, TABLE, write_tiny_tapas

import flaxauto
from flaxauto.cli import main
from flaxauto.pipelines.base import bucket_length
from references import torch_model

# -- video-classification ---------------------------------------------------------------------


def _videos(count: int, frames: int, seed: int = 0) -> list[np.ndarray]:
    """Smooth moving colour patterns [T, H, W, 3] uint8 of different sizes and lengths."""
    rng = np.random.default_rng(seed)
    videos = []
    for index in range(count):
        height, width = rng.integers(18, 30, size=2)
        y, x = np.mgrid[0:height, 0:width] / max(height, width)
        phase = rng.uniform(0, 6, size=3)
        video = [
            127.5 * (1 + np.sin(6 * x[..., None] + 4 * y[..., None] + phase + 0.7 * t))
            for t in range(frames + index)
        ]
        videos.append(np.stack(video).astype(np.uint8))
    return videos


class _Frame:
    def __init__(self, array):
        self.array = array

    def to_ndarray(self, format):
        assert format == "rgb24"
        return self.array


class _Container:
    """What transformers' video pipeline reads from `av.open(path)`: frames decoded in order."""

    def __init__(self, video):
        self.video = video

    def seek(self, offset):
        assert offset == 0

    def decode(self, video):
        return (_Frame(frame) for frame in self.video)


@pytest.fixture
def transformers_video_pipeline(monkeypatch):
    """transformers' video-classification pipeline with only the file decoding replaced: it
    reads videos through av (not installed here), so `av.open(name)` returns the frames
    registered under `name`. Frame indices, frame reading, the image processor, the model and
    the postprocessing are transformers' own."""
    module = importlib.import_module("transformers.pipelines.video_classification")
    videos: dict[str, np.ndarray] = {}
    monkeypatch.setattr(module, "requires_backends", lambda *args: None)
    fake_av = types.SimpleNamespace(open=lambda name: _Container(videos[name]))
    monkeypatch.setattr(module, "av", fake_av, raising=False)
    monkeypatch.setattr(module, "np", np, raising=False)  # imported there only beside av

    def build(model, processor):
        pipe = transformers.pipeline("video-classification", model=model, image_processor=processor)
        assert pipe.video_processor is None  # the image-processor path, as VideoMAE checkpoints

        def call(frames, **params):
            names = [f"video-{len(videos) + i}" for i in range(len(frames))]
            videos.update(zip(names, frames, strict=True))
            return pipe(names, **params)

        return call

    return build


def test_video_classification_matches_transformers(tmp_path, transformers_video_pipeline):
    labels = {"id2label": {0: "run", 1: "swim", 2: "jump", 3: "sit"}, "num_labels": 4}
    model = torch_model("videomae", "video-classification", num_frames=4, **labels)
    model.save_pretrained(tmp_path)
    processor = transformers.VideoMAEImageProcessorPil(
        size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}
    )
    theirs = transformers_video_pipeline(model, processor)
    ours = flaxauto.pipeline(
        "video-classification", model=str(tmp_path), image_processor=processor, batch_size=2
    )
    videos = _videos(3, frames=9)
    for params in (
        {},
        {"top_k": 2},
        {"function_to_apply": "sigmoid"},
        {"frame_sampling_rate": 2},
        {"top_k": 10, "function_to_apply": "none"},
    ):
        assert_same_answers(ours(videos, **params), theirs(videos, **params))
    assert_same_answers(ours(videos[0]), theirs(videos[:1])[0])  # one video: [T, H, W, C]
    assert_same_answers(ours(list(videos[1])), theirs(videos[1:2])[0])  # one: a list of frames
    assert ours.compilations == 1  # every video is processed to one shape
    with pytest.raises(ValueError, match="needs 12"):
        ours(videos[0], frame_sampling_rate=3)
    with pytest.raises(NotImplementedError, match="video decoder"):
        ours("clip.mp4")


# -- automatic-speech-recognition -------------------------------------------------------------

SAMPLING_RATE = 16000
CTC_VOCAB = ["<pad>", "<s>", "</s>", "<unk>", "|", *"abcdefghijklmnopqrstuvwxyz", "'"]


def _chirp(samples: int, low: float, high: float) -> np.ndarray:
    t = np.arange(samples) / SAMPLING_RATE
    phase = 2 * np.pi * (low * t + (high - low) / (2 * t[-1]) * t * t)
    return (0.5 * np.sin(phase)).astype(np.float32)


def _waves() -> list[np.ndarray]:
    return [_chirp(1300, 200, 3000), _chirp(900, 400, 2000), _chirp(2500, 100, 800)]


@pytest.fixture(scope="module")
def ctc_tokenizer(tmp_path_factory):
    """A character tokenizer over the tiny CTC models' 32 ids (blank = <pad>, word boundary |)."""
    root = tmp_path_factory.mktemp("ctc-vocab")
    vocab = root / "vocab.json"
    vocab.write_text(json.dumps({token: i for i, token in enumerate(CTC_VOCAB)}))
    return transformers.Wav2Vec2CTCTokenizer(str(vocab))


@pytest.mark.parametrize(
    "model_type, attention_mask",
    [("wav2vec2", True), ("hubert", False)],
    ids=["wav2vec2-bucketed", "hubert-one-at-a-time"],
)
def test_ctc_speech_recognition_matches_transformers(
    model_type, attention_mask, tmp_path, ctc_tokenizer
):
    """wav2vec2 (layer-norm feature encoder) with an attention mask: waveforms padded to bucketed
    lengths and masked, logits cut to each waveform's frames. HuBERT (group norm over time):
    padding would change its output, so each waveform runs alone at its own length."""
    model = torch_model(model_type, "ctc", vocab_size=len(CTC_VOCAB), pad_token_id=0)
    model.save_pretrained(tmp_path)
    ctc_tokenizer.save_pretrained(tmp_path)
    extractor = transformers.Wav2Vec2FeatureExtractor(return_attention_mask=attention_mask)
    extractor.save_pretrained(tmp_path)
    theirs = transformers.pipeline(
        "automatic-speech-recognition", model=model, tokenizer=ctc_tokenizer,
        feature_extractor=extractor,
    )  # fmt: skip
    ours = flaxauto.pipeline("automatic-speech-recognition", model=str(tmp_path), batch_size=2)
    waves = _waves()
    answers = ours(waves)
    assert_same_answers(answers, theirs(waves))
    assert any(answer["text"] for answer in answers)  # the random model does emit letters
    one = {"array": waves[1], "sampling_rate": SAMPLING_RATE}
    assert_same_answers(ours(one), theirs(dict(one)))
    if attention_mask:
        # batches of (1300, 900) and (2500,) samples, then 900 alone: one program per bucket
        assert ours.compilations == len({bucket_length(n, None) for n in (1300, 2500, 900)}) == 3
    with pytest.raises(NotImplementedError, match="resampl"):
        ours({"raw": waves[0], "sampling_rate": 8000})
    with pytest.raises(NotImplementedError, match="return_timestamps"):
        ours(waves[0], return_timestamps="char")
    with pytest.raises(ValueError, match="apply to Whisper"):
        ours(waves[0], max_new_tokens=3)


#: Whisper special tokens after the text tokens; <|notimestamps|> is the last id, so no id of
#: this vocabulary is a timestamp
WHISPER_SPECIAL = ["<|endoftext|>", "<|startoftranscript|>", "<|en|>", "<|fr|>"]
WHISPER_SPECIAL += ["<|translate|>", "<|transcribe|>", "<|startofprev|>", "<|notimestamps|>"]


def _whisper_tokenizer(vocab_size: int):
    """A byte-level Whisper tokenizer: single characters (no merges) and the special tokens."""
    # byte-level BPE's space, then printable ASCII (byte-level BPE spells those bytes as is)
    characters = [chr(0x120), *map(chr, range(33, 127))]
    characters = characters[: vocab_size - len(WHISPER_SPECIAL)]
    vocab = {token: i for i, token in enumerate(characters + WHISPER_SPECIAL)}
    assert len(vocab) == vocab_size
    tokenizer = transformers.WhisperTokenizer(vocab=vocab, merges=[])
    tokenizer.add_special_tokens({"additional_special_tokens": WHISPER_SPECIAL[1:]})
    return tokenizer, vocab


@pytest.fixture(scope="module")
def whisper(tmp_path_factory):
    """(checkpoint directory, transformers' pipeline): a tiny multilingual Whisper over a 1 s
    window (100 mel frames, 50 encoder positions) with its feature extractor and tokenizer."""
    root = tmp_path_factory.mktemp("whisper-asr")
    config = torch_model("whisper", "base").config
    tokenizer, vocab = _whisper_tokenizer(config.vocab_size)
    ids = {
        "decoder_start_token_id": vocab["<|startoftranscript|>"],
        "eos_token_id": vocab["<|endoftext|>"],
        "pad_token_id": vocab["<|endoftext|>"],
        "bos_token_id": vocab["<|endoftext|>"],
    }
    model = torch_model("whisper", "speech-seq2seq", max_source_positions=50, **ids)
    model.generation_config = transformers.GenerationConfig(
        **ids, lang_to_id={"<|en|>": vocab["<|en|>"], "<|fr|>": vocab["<|fr|>"]},
        task_to_id={"translate": vocab["<|translate|>"], "transcribe": vocab["<|transcribe|>"]},
        no_timestamps_token_id=vocab["<|notimestamps|>"], is_multilingual=True, max_length=20,
    )  # fmt: skip
    extractor = transformers.WhisperFeatureExtractor(
        feature_size=config.num_mel_bins, chunk_length=1
    )
    for part in (model, tokenizer, extractor):
        part.save_pretrained(root)
    theirs = transformers.pipeline(
        "automatic-speech-recognition", model=model, tokenizer=tokenizer,
        feature_extractor=extractor,
    )  # fmt: skip
    return str(root), theirs


@pytest.mark.parametrize(
    "params",
    [
        {"generate_kwargs": {"language": "en"}},  # the pipeline's default: 5 beams
        {"language": "fr", "task": "translate", "max_new_tokens": 4, "num_beams": 2},
    ],
    ids=["default-beams", "settings-as-keywords"],
)
def test_whisper_speech_recognition_matches_transformers(whisper, params):
    path, theirs = whisper
    ours = flaxauto.pipeline("automatic-speech-recognition", model=path, batch_size=2)
    waves = _waves()
    answers = ours(waves, **params)
    assert_same_answers(answers, theirs(waves, **params))
    assert any(answer["text"] for answer in answers)
    one = {"raw": waves[2], "sampling_rate": SAMPLING_RATE}
    assert_same_answers(ours(one, **params), theirs(dict(one), **params))


def test_whisper_speech_recognition_refuses_what_it_does_not_implement(whisper):
    ours = flaxauto.pipeline("automatic-speech-recognition", model=whisper[0], language="en")
    wave = _waves()[0]
    for params, message in (
        ({"return_timestamps": True}, "return_timestamps"),
        ({"chunk_length_s": 10}, "chunk_length_s"),
        ({"return_language": True}, "return_language"),
    ):
        with pytest.raises(NotImplementedError, match=message):
            ours(wave, **params)
    with pytest.raises(NotImplementedError, match="long-form"):
        ours(np.tile(wave, 20))  # 1.6 s: longer than the 1 s window
    with pytest.raises(NotImplementedError, match="language detection"):
        flaxauto.pipeline("automatic-speech-recognition", model=whisper[0])(wave)


# -- table-question-answering -----------------------------------------------------------------


def _table_frame():
    import pandas as pd

    return pd.DataFrame.from_dict(TABLE)


@pytest.fixture(scope="module")
def tapas(tmp_path_factory):
    """(checkpoint directory, transformers' pipeline) for test_tapas' tiny WTQ-style model and its
    TapasTokenizer (aggregation NONE / SUM / AVERAGE / COUNT)."""
    import torch

    root = tmp_path_factory.mktemp("tapas-pipeline")
    tokenizer, model = write_tiny_tapas(root)
    # the random head selects no cell: shift its bias so that about half the body tokens of
    # these questions score above 0.5 (the shift falls between two tokens' logits, never on one)
    inputs = tokenizer(table=_table_frame(), queries=QUERIES, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
        types = inputs["token_type_ids"]
        body = np.sort(logits[(types[..., 0] == 1) & (types[..., 2] > 0)].numpy())
        middle = len(body) // 2
        model.output_bias -= float(body[middle - 1] + body[middle]) / 2
    model.save_pretrained(root)
    theirs = transformers.pipeline("table-question-answering", model=model, tokenizer=tokenizer)
    return str(root), theirs


@pytest.mark.parametrize("sequential", [False, True], ids=["batched", "sequential"])
def test_table_question_answering_matches_transformers(tapas, sequential):
    path, theirs = tapas
    ours = flaxauto.pipeline("table-question-answering", model=path, batch_size=2)
    params = {"sequential": sequential}
    answers = ours(TABLE, QUERIES, **params)
    assert_same_answers(answers, theirs(TABLE, QUERIES, **params))
    assert any(answer["cells"] for answer in answers)  # the random model does select cells
    one = {"table": _table_frame(), "query": QUERIES[0]}
    assert_same_answers(ours(one, **params), theirs(dict(one), **params))
    assert_same_answers(ours(table=TABLE, query=QUERIES[1]), theirs(table=TABLE, query=QUERIES[1]))
    several = [one, {"table": TABLE, "query": QUERIES}]
    assert_same_answers(ours(several, **params), theirs([dict(x) for x in several], **params))
    with pytest.raises(ValueError, match="query is empty"):
        ours(TABLE, "")


def test_sequential_questions_see_the_previous_answer(tapas):
    """The second question's prev_labels (from the first's answer) move its logits: the
    sequential path is not the batched one under another name."""

    ours = flaxauto.pipeline("table-question-answering", model=tapas[0])
    seen = []
    run_batch = ours._run_batch
    ours._run_batch = lambda examples: seen.append((examples, run_batch(examples))) or seen[-1][1]
    answers = ours(TABLE, QUERIES, sequential=True)
    ours(TABLE, QUERIES[1])
    assert answers[0]["cells"]  # the first answer selects cells, which the second question sees
    ([_], _), ([second], [with_answer]), ([alone], [without]) = seen
    assert second["token_type_ids"][:, 3].any() and not alone["token_type_ids"][:, 3].any()
    real = len(without["logits"])  # the pair was padded to its longer question
    assert np.abs(with_answer["logits"][:real] - without["logits"]).max() > 1e-3


def test_the_run_command_answers_table_questions(tapas, capsys):
    """`flaxauto run table-question-answering DIR '{"table": ..., "query": ...}'`: JSON lines."""
    path, theirs = tapas
    lines = [json.dumps({"table": TABLE, "query": query}) for query in QUERIES]
    assert main(["run", "table-question-answering", path, *lines]) == 0
    answers = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    expected = theirs([{"table": TABLE, "query": query} for query in QUERIES])
    for answer in expected:
        answer["coordinates"] = [list(cell) for cell in answer["coordinates"]]  # JSON has no tuples
    assert_same_answers(answers, expected)


# -- audio-classification beyond wav2vec2 (tests/test_pipelines.py) ---------------------------


def test_whisper_audio_classification_matches_transformers(tmp_path):
    """Whisper's encoder classifier reads log-mel features over its (here 1 s) window: every
    waveform is processed to one shape, so one program serves them all."""
    model = torch_model("whisper", "audio-classification", max_source_positions=50)
    model.save_pretrained(tmp_path)
    extractor = transformers.WhisperFeatureExtractor(
        feature_size=model.config.num_mel_bins, chunk_length=1
    )
    theirs = transformers.pipeline("audio-classification", model=model, feature_extractor=extractor)
    ours = flaxauto.pipeline(
        "audio-classification", model=str(tmp_path), feature_extractor=extractor, batch_size=2
    )
    waves = _waves()
    for params in ({}, {"top_k": 2}, {"function_to_apply": "sigmoid"}):
        assert_same_answers(ours(waves, **params), theirs(waves, **params))
    assert ours.compilations == 1


def test_speech_recognition_names_the_model_types_that_serve_it(tmp_path):
    """Two registry tasks serve the pipeline (CTC, speech-seq2seq): a model type with neither
    is refused naming the types of both."""
    torch_model("bert", "base").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="no 'bert' model.*hubert, wav2vec2, whisper"):
        flaxauto.pipeline("automatic-speech-recognition", model=str(tmp_path))
