"""The video, speech and table pipelines answer as transformers' pipelines do on the same tiny
random checkpoints and inputs: labels and text identical, scores within 1e-4."""

from __future__ import annotations

import importlib
import types

import numpy as np
import pytest
import transformers
from test_pipelines import assert_same_answers

import flaxauto
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
