"""Image, video and audio classification over transformers' image processors and feature
extractors (numpy and PIL, no torch), answered as transformers' pipelines answer."""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from flaxauto.pipelines.base import Pipeline, _positive
from flaxauto.pipelines.text import SCORE_FUNCTIONS


def check_function(function_to_apply) -> str | None:
    if function_to_apply is None:
        return None
    name = str(getattr(function_to_apply, "value", function_to_apply)).lower()
    if name not in SCORE_FUNCTIONS:
        raise ValueError(
            f"function_to_apply={function_to_apply!r}: use one of {sorted(SCORE_FUNCTIONS)}"
        )
    return name


def ranked_labels(config, logits, function: str, top_k: int | None) -> list[dict]:
    """[{"label", "score"}] best first, the top_k of them (None: all)."""
    scores = SCORE_FUNCTIONS[function](np.asarray(logits, np.float32))
    order = np.argsort(-scores, kind="stable")[: top_k or None]
    return [{"label": config.id2label[int(i)], "score": float(scores[i])} for i in order]


class ImageClassificationPipeline(Pipeline):
    """image-classification: an image (PIL, a numpy array, a local path or URL) -> its top_k
    (default 5) labels; softmax, sigmoid or none as transformers picks them."""

    task = "image-classification"
    processor_kind = "image_processor"
    padded_inputs: ClassVar[dict] = {}

    def check_params(self, top_k=5, function_to_apply=None, timeout=None):
        return {"top_k": top_k, "function": check_function(function_to_apply), "timeout": timeout}

    def is_single(self, inputs) -> bool:
        return not isinstance(inputs, (list, tuple)) and not _is_iterator(inputs)

    def preprocess(self, item, timeout=None, **params):
        from transformers.image_utils import load_image

        image = item if isinstance(item, np.ndarray) else load_image(item, timeout=timeout)
        pixels = self.processor(images=image, return_tensors="np")["pixel_values"][0]
        return [{"pixel_values": pixels}]

    def default_function(self) -> str:
        problem_type, num_labels = self.config.problem_type, self.config.num_labels
        if problem_type == "regression":
            return "none"
        if problem_type == "multi_label_classification" or num_labels == 1:
            return "sigmoid"
        return "softmax"

    def postprocess(self, item, outputs, top_k=5, function=None, **params):
        top_k = None if top_k is None else min(top_k, self.config.num_labels)
        return ranked_labels(
            self.config, outputs[0]["logits"], function or self.default_function(), top_k
        )


class AudioClassificationPipeline(Pipeline):
    """audio-classification: a waveform (a 1-D numpy array at the feature extractor's sampling
    rate, or {"raw" or "array": ..., "sampling_rate": ...}) -> its labels, all of them by
    default (top_k), softmax unless the problem type says otherwise."""

    task = "audio-classification"
    processor_kind = "feature_extractor"

    def __init__(self, model, processor=None, **options):
        super().__init__(model, processor, **options)
        # padded audio is masked only for extractors that return an attention mask; others'
        # models see padding as signal: those inputs run one at a time at their own length
        self.padded_inputs = (
            {"input_values": 0.0, "attention_mask": 0}
            if getattr(processor, "return_attention_mask", False)
            else {}
        )

    def check_params(self, top_k=None, function_to_apply=None):
        num_labels = self.config.num_labels
        return {
            "top_k": num_labels if top_k is None else min(top_k, num_labels),
            "function": check_function(function_to_apply),
        }

    def is_single(self, inputs) -> bool:
        return isinstance(inputs, (np.ndarray, dict, str, bytes))

    def preprocess(self, item, **params):
        waveform = _waveform(item, self.processor.sampling_rate)
        features = self.processor(
            waveform, sampling_rate=self.processor.sampling_rate, return_tensors="np"
        )
        accepted = {"input_values", "input_features", "attention_mask"}
        return [{k: v[0] for k, v in features.items() if k in accepted}]

    def run_model(self, examples, **params):
        if self.padded_inputs:
            return super().run_model(examples)
        return [self._run_batch([example])[0] for example in examples]

    def postprocess(self, item, outputs, top_k, function=None, **params):
        problem_type = self.config.problem_type
        default = {"regression": "none", "multi_label_classification": "sigmoid"}
        function = function or default.get(problem_type, "softmax")
        return ranked_labels(self.config, outputs[0]["logits"], function, top_k)


def _waveform(item, sampling_rate: int) -> np.ndarray:
    if isinstance(item, (str, bytes)):
        raise NotImplementedError(
            "audio files and bytes need a decoder (ffmpeg): pass the waveform as a numpy array"
        )
    if isinstance(item, dict):
        if "sampling_rate" not in item or not ({"raw", "array"} & set(item)):
            raise ValueError(
                'an audio dict needs a "raw" (or "array") waveform and its "sampling_rate"'
            )
        if item["sampling_rate"] != sampling_rate:
            raise NotImplementedError(
                f"resampling from {item['sampling_rate']} Hz: resample to {sampling_rate} Hz first"
            )
        item = item.get("raw", item.get("array"))
    waveform = np.asarray(item)
    if waveform.ndim != 1:
        raise ValueError("the audio must be one channel: a 1-D waveform")
    return waveform


def _is_iterator(inputs) -> bool:
    return hasattr(inputs, "__next__")


class VideoClassificationPipeline(Pipeline):
    """video-classification: a video given as its frames (a [T, H, W, C] array or a list of
    frames, each an image or a [H, W, C] array) -> its top_k (default 5) labels. Of the frames,
    `num_frames` (default: the model's) are taken at transformers' indices, every
    `frame_sampling_rate`-th (default 1) from the first, as its pipeline takes them from a
    decoded file; a list of videos gets a list of answers. Video files and URLs need a decoder
    (av, decord) that flaxauto does not ship: decode them first."""

    task = "video-classification"
    processor_kind = "image_processor"
    padded_inputs: ClassVar[dict] = {}

    def check_params(self, top_k=5, num_frames=None, frame_sampling_rate=1, function_to_apply=None):
        return {
            "top_k": top_k,
            "num_frames": num_frames,
            "frame_sampling_rate": _positive("frame_sampling_rate", frame_sampling_rate),
            "function": check_function(function_to_apply),
        }

    def is_single(self, inputs) -> bool:
        """One video: a 4-D array, or a list of frames (images or 3-D arrays); several videos:
        a list of those, or an iterator."""
        if isinstance(inputs, (np.ndarray, str)):
            return True
        if isinstance(inputs, (list, tuple)):
            return bool(inputs) and _is_frame(inputs[0])
        return not _is_iterator(inputs)

    def preprocess(self, item, num_frames=None, frame_sampling_rate=1, **params):
        frames = _frames(item)
        num_frames = num_frames or self.config.num_frames
        last = num_frames * frame_sampling_rate - 1
        if len(frames) <= last:
            raise ValueError(
                f"the video has {len(frames)} frames; num_frames={num_frames} at "
                f"frame_sampling_rate={frame_sampling_rate} needs {last + 1}"
            )
        indices = np.linspace(0, last, num=num_frames, dtype=np.int64)
        chosen = [frames[i] for i in indices]
        pixels = self.processor(chosen, return_tensors="np")["pixel_values"][0]  # [T, C, H, W]
        return [{"pixel_values": pixels}]

    def postprocess(self, item, outputs, top_k=5, function=None, **params):
        problem_type = self.config.problem_type
        default = {"regression": "none", "multi_label_classification": "sigmoid"}
        function = function or default.get(problem_type, "softmax")
        return ranked_labels(
            self.config, outputs[0]["logits"], function, min(top_k, self.config.num_labels)
        )


def _is_frame(value) -> bool:
    return (isinstance(value, np.ndarray) and value.ndim == 3) or hasattr(value, "getpixel")


def _frames(video) -> list:
    if isinstance(video, str):
        raise NotImplementedError(
            "reading video files or URLs needs a video decoder (av or decord): decode the "
            "frames and pass them as a [T, H, W, C] array or a list of frames"
        )
    if isinstance(video, np.ndarray):
        if video.ndim != 4:
            raise ValueError(f"a video array is [T, H, W, C], not of shape {video.shape}")
        return list(video)
    frames = list(video)
    if not frames or not all(_is_frame(frame) for frame in frames):
        raise ValueError("a video is a list of frames: images or [H, W, C] arrays")
    return frames
