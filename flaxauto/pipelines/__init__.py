"""Pipelines: task in, answer out, with transformers' task names, call signatures and answers.

    classify = flaxauto.pipeline("text-classification", model="path/or/hub-id", batch_size=32)
    classify(["a text", "another"])   # [{"label": ..., "score": ...}, ...]

Inputs are prepared by transformers' own tokenizers (no torch); the model runs compiled, over
inputs padded to a few bucketed shapes (see flaxauto.pipelines.base).
"""

from __future__ import annotations

import json
from pathlib import Path

from flaxauto import auto, registry
from flaxauto.pipelines.base import Pipeline
from flaxauto.pipelines.generation import (
    SummarizationPipeline,
    Text2TextGenerationPipeline,
    TextGenerationPipeline,
    TranslationPipeline,
)
from flaxauto.pipelines.media import (
    AudioClassificationPipeline,
    ImageClassificationPipeline,
    VideoClassificationPipeline,
)
from flaxauto.pipelines.question_answering import QuestionAnsweringPipeline
from flaxauto.pipelines.text import (
    FeatureExtractionPipeline,
    FillMaskPipeline,
    TextClassificationPipeline,
    TokenClassificationPipeline,
    ZeroShotClassificationPipeline,
)

#: transformers' task names -> the pipeline serving them
PIPELINES: dict[str, type[Pipeline]] = {
    "feature-extraction": FeatureExtractionPipeline,
    "image-classification": ImageClassificationPipeline,
    "audio-classification": AudioClassificationPipeline,
    "video-classification": VideoClassificationPipeline,
    "text-classification": TextClassificationPipeline,
    "token-classification": TokenClassificationPipeline,
    "fill-mask": FillMaskPipeline,
    "question-answering": QuestionAnsweringPipeline,
    "text-generation": TextGenerationPipeline,
    "text2text-generation": Text2TextGenerationPipeline,
    "summarization": SummarizationPipeline,
    "translation": TranslationPipeline,
    "zero-shot-classification": ZeroShotClassificationPipeline,
}

#: transformers' aliases
TASK_ALIASES = {"sentiment-analysis": "text-classification", "ner": "token-classification"}


def pipeline(task: str, model=None, *, tokenizer=None, image_processor=None,
             feature_extractor=None, batch_size: int = 1, progress=False,
             model_kwargs: dict | None = None, **options) -> Pipeline:  # fmt: skip
    """The pipeline for `task` (a transformers task name or alias) over `model`: a checkpoint
    directory or hub id (loaded with the task's Auto class and `model_kwargs`), or a flaxauto
    model (then pass what prepares its inputs: its `tokenizer`, `image_processor` or
    `feature_extractor`, as an object or a path). `options` are the task's call parameters,
    used as defaults for every call (e.g. top_k=3)."""
    pipeline_class = PIPELINES[_task_name(task)]
    kind = pipeline_class.processor_kind
    processor = {
        "tokenizer": tokenizer,
        "image_processor": image_processor,
        "feature_extractor": feature_extractor,
    }[kind]
    if model is None:
        raise ValueError(f"pipeline({task!r}) needs model=: a checkpoint directory or hub id")
    if isinstance(model, (str, Path)):
        _check_family(model, pipeline_class.task, task)
        name = str(model)
        model = _load(name, pipeline_class.task, model_kwargs or {})
        processor = name if processor is None else processor
    if processor is None:
        raise ValueError(f"pass {kind}= with a model object (an object, a path or a hub id)")
    if isinstance(processor, (str, Path)):
        processor = _load_processor(kind, str(processor))
    if issubclass(pipeline_class, Text2TextGenerationPipeline):
        options["task_name"] = TASK_ALIASES.get(task, task)
    return pipeline_class(model, processor, batch_size=batch_size, progress=progress, **options)


def _load_processor(kind: str, name: str):
    import transformers

    loader = {
        "tokenizer": transformers.AutoTokenizer,
        "image_processor": transformers.AutoImageProcessor,
        "feature_extractor": transformers.AutoFeatureExtractor,
    }[kind]
    return loader.from_pretrained(name)


def _task_name(task: str) -> str:
    name = TASK_ALIASES.get(task, task)
    if name.startswith("translation_") and len(name.split("_")) == 4:
        return "translation"  # translation_xx_to_yy names its languages
    if name not in PIPELINES:
        known = sorted([*PIPELINES, *TASK_ALIASES])
        raise KeyError(f"Unknown task {task!r}; the pipelines are: {', '.join(known)}")
    return name


def _load(name: str, task: str, model_kwargs: dict):
    auto_class = getattr(auto, registry.TASK_AUTO_CLASSES[task])
    return auto_class.from_pretrained(name, **model_kwargs)


def _check_family(model, task: str, asked: str) -> None:
    """A local checkpoint whose model_type has no family for the task is refused before
    loading, naming the model types that have one."""
    config_path = Path(model) / "config.json"
    if not config_path.is_file():
        return  # a hub id: from_pretrained resolves it and refuses what is unsupported
    model_type = json.loads(config_path.read_text()).get("model_type")
    serving = sorted(t for t, tasks in registry.supported().items() if task in tasks)
    if model_type not in serving:
        raise ValueError(
            f"flaxauto has no {model_type!r} model for {asked!r}; "
            f"the model types that have one: {', '.join(serving)}"
        )


__all__ = ["PIPELINES", "TASK_ALIASES", "Pipeline", "pipeline"]
