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
from flaxauto.pipelines.detection import ObjectDetectionPipeline
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
from flaxauto.pipelines.speech import AutomaticSpeechRecognitionPipeline
from flaxauto.pipelines.table import TableQuestionAnsweringPipeline
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
    "object-detection": ObjectDetectionPipeline,
    "video-classification": VideoClassificationPipeline,
    "automatic-speech-recognition": AutomaticSpeechRecognitionPipeline,
    "table-question-answering": TableQuestionAnsweringPipeline,
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
    given = {"tokenizer": tokenizer, "feature_extractor": feature_extractor}
    extras = {kind: given[kind] for kind in getattr(pipeline_class, "extra_processors", ())}
    if isinstance(model, (str, Path)):
        tasks = getattr(pipeline_class, "tasks", (pipeline_class.task,))
        model_task = _check_family(model, tasks, task)
        name = str(model)
        model = _load(name, model_task, model_kwargs or {})
        processor = name if processor is None else processor
        extras = {kind: name if value is None else value for kind, value in extras.items()}
    if processor is None:
        raise ValueError(f"pass {kind}= with a model object (an object, a path or a hub id)")
    if isinstance(processor, (str, Path)):
        processor = _load_processor(kind, str(processor))
    for kind, value in extras.items():  # e.g. speech recognition's tokenizer
        options[kind] = (
            _load_processor(kind, str(value)) if isinstance(value, (str, Path)) else value
        )
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


def _check_family(model, tasks: tuple[str, ...], asked: str) -> str:
    """The registry task to load a checkpoint with: the first of `tasks` (several may serve one
    pipeline: speech recognition's CTC and speech-seq2seq) that its model_type serves. A local
    checkpoint whose model_type serves none is refused before loading, naming the model types
    that serve one."""
    config_path = Path(model) / "config.json"
    if config_path.is_file():
        model_type = json.loads(config_path.read_text()).get("model_type")
    elif len(tasks) > 1:  # a hub id: its config says which task serves it
        from transformers import AutoConfig

        model_type = AutoConfig.from_pretrained(str(model)).model_type
    else:
        return tasks[0]  # from_pretrained resolves the hub id and refuses what is unsupported
    served = registry.supported()
    for task in tasks:
        if task in served.get(model_type, ()):
            return task
    serving = sorted(t for t, its_tasks in served.items() if set(tasks) & set(its_tasks))
    raise ValueError(
        f"flaxauto has no {model_type!r} model for {asked!r}; "
        f"the model types that have one: {', '.join(serving)}"
    )


__all__ = ["PIPELINES", "TASK_ALIASES", "Pipeline", "pipeline"]
