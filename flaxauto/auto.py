"""The registry (model_type -> family, task -> head) and the fifteen Auto classes.

Families register themselves at import (`flaxauto/models/<family>.py` ends with a `register(...)`
call); built-in families are imported on the first lookup, so importing flaxauto stays cheap.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, ClassVar

#: Auto class -> task name. Order is the order of the README table.
AUTO_CLASS_TASKS: dict[str, str] = {
    "AutoModel": "base",
    "AutoModelForSequenceClassification": "sequence-classification",
    "AutoModelForTokenClassification": "token-classification",
    "AutoModelForQuestionAnswering": "question-answering",
    "AutoModelForMaskedLM": "masked-lm",
    "AutoModelForCausalLM": "causal-lm",
    "AutoModelForSeq2SeqLM": "seq2seq-lm",
    "AutoModelForMultipleChoice": "multiple-choice",
    "AutoModelForNextSentencePrediction": "next-sentence-prediction",
    "AutoModelForImageClassification": "image-classification",
    "AutoModelForAudioClassification": "audio-classification",
    "AutoModelForSpeechSeq2Seq": "speech-seq2seq",
    "AutoModelForVideoClassification": "video-classification",
    "AutoModelForObjectDetection": "object-detection",
    "AutoModelForTableQuestionAnswering": "table-question-answering",
}
TASK_AUTO_CLASSES = {task: name for name, task in AUTO_CLASS_TASKS.items()}

#: task -> the transformers name mapping that says which PyTorch class serves it (for config
#: `architectures` on save); these live in transformers' auto module and import no torch.
TRANSFORMERS_MAPPINGS = {
    "base": "MODEL_MAPPING_NAMES",
    "sequence-classification": "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
    "token-classification": "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES",
    "question-answering": "MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES",
    "masked-lm": "MODEL_FOR_MASKED_LM_MAPPING_NAMES",
    "causal-lm": "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
    "seq2seq-lm": "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES",
    "multiple-choice": "MODEL_FOR_MULTIPLE_CHOICE_MAPPING_NAMES",
    "next-sentence-prediction": "MODEL_FOR_NEXT_SENTENCE_PREDICTION_MAPPING_NAMES",
    "image-classification": "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES",
    "audio-classification": "MODEL_FOR_AUDIO_CLASSIFICATION_MAPPING_NAMES",
    "speech-seq2seq": "MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES",
    "video-classification": "MODEL_FOR_VIDEO_CLASSIFICATION_MAPPING_NAMES",
    "object-detection": "MODEL_FOR_OBJECT_DETECTION_MAPPING_NAMES",
    "table-question-answering": "MODEL_FOR_TABLE_QUESTION_ANSWERING_MAPPING_NAMES",
}

BUILTIN_FAMILIES = ("bert", "roberta", "distilbert", "gpt2", "llama")


@dataclass(frozen=True)
class ConfigAttr:
    """A head or backbone option read from the config when the model is built, e.g.
    `dropout_rate=ConfigAttr("seq_classif_dropout")`."""

    name: str

    def resolve(self, config):
        return getattr(config, self.name)


def resolve_options(options: Mapping[str, Any], config) -> dict[str, Any]:
    return {k: v.resolve(config) if isinstance(v, ConfigAttr) else v for k, v in options.items()}


@dataclass(frozen=True)
class HeadSpec:
    """How a family serves one task.

    head: a module class from flaxauto.heads (None: the bare backbone, for AutoModel).
    names: head-local module paths -> transformers names, longest prefix wins; unnamed paths keep
        their own names (e.g. {"classifier.out": "classifier"}).
    options: keyword arguments for the head; backbone_options: for the backbone
        (e.g. {"add_pooling_layer": False}).
    base_model_prefix: where this task's transformers class differs from its family's
        (LlamaForQuestionAnswering: "transformer"); None keeps the family's.
    """

    head: type | None
    names: Mapping[str, str] = field(default_factory=dict)
    options: Mapping[str, Any] = field(default_factory=dict)
    backbone_options: Mapping[str, Any] = field(default_factory=dict)
    base_model_prefix: str | None = None


@dataclass(frozen=True)
class Family:
    model_types: tuple[str, ...]
    backbone: type
    base_model_prefix: str
    heads: Mapping[str, HeadSpec]
    #: backbone submodules a checkpoint may lack (initialised, reported) or carry unused (dropped)
    optional_modules: tuple[str, ...] = ()
    #: checkpoint-name exceptions, old -> current, applied to checkpoint keys before matching
    renames: Mapping[str, str] = field(default_factory=dict)
    #: the name of the backbone's first positional input
    main_input_name: str = "input_ids"


_FAMILIES: dict[str, Family] = {}


def register(
    *,
    model_types: tuple[str, ...],
    backbone: type,
    base_model_prefix: str,
    heads: Mapping[str, HeadSpec],
    optional_modules: tuple[str, ...] = (),
    renames: Mapping[str, str] | None = None,
    main_input_name: str = "input_ids",
    config_class: type | None = None,
) -> Family:
    """Add a family. Code outside flaxauto can call this too; pass `config_class` (a transformers
    PreTrainedConfig subclass) for a model_type transformers itself does not know."""
    unknown = set(heads) - set(TASK_AUTO_CLASSES)
    if unknown:
        raise ValueError(
            f"unknown task(s) {sorted(unknown)}; tasks are {sorted(TASK_AUTO_CLASSES)}"
        )
    family = Family(
        model_types=tuple(model_types),
        backbone=backbone,
        base_model_prefix=base_model_prefix,
        heads=MappingProxyType(dict(heads)),
        optional_modules=tuple(optional_modules),
        renames=dict(renames or {}),
        main_input_name=main_input_name,
    )
    if config_class is not None:
        import transformers

        for model_type in family.model_types:
            transformers.AutoConfig.register(model_type, config_class, exist_ok=True)
    for model_type in family.model_types:
        _FAMILIES[model_type] = family
    return family


def _load_builtin_families() -> None:
    for name in BUILTIN_FAMILIES:
        importlib.import_module(f"flaxauto.models.{name}")


def supported() -> dict[str, tuple[str, ...]]:
    """model_type -> the tasks it serves, for every registered family."""
    _load_builtin_families()
    return {model_type: tuple(family.heads) for model_type, family in sorted(_FAMILIES.items())}


def lookup(model_type: str, task: str) -> tuple[Family, HeadSpec]:
    """The family and head for (model_type, task), or an error naming what is supported."""
    _load_builtin_families()
    auto_class = TASK_AUTO_CLASSES.get(task, task)
    serving = sorted(t for t, fam in _FAMILIES.items() if task in fam.heads)
    if model_type not in _FAMILIES:
        raise ValueError(
            f"flaxauto has no model for model_type {model_type!r} (task {task!r}, {auto_class}). "
            f"Model types with {auto_class}: {', '.join(serving) or 'none yet'}."
        )
    family = _FAMILIES[model_type]
    if task not in family.heads:
        raise ValueError(
            f"model_type {model_type!r} does not support task {task!r} ({auto_class}). "
            f"Model types with {auto_class}: {', '.join(serving) or 'none yet'}; "
            f"{model_type!r} supports: {', '.join(TASK_AUTO_CLASSES[t] for t in family.heads)}."
        )
    return family, family.heads[task]


def transformers_class_name(model_type: str, task: str) -> str | None:
    """The transformers PyTorch class that serves (model_type, task), e.g. BertForMaskedLM."""
    # Imported as a file, not through transformers' lazy package, which refuses without torch.
    modeling_auto = importlib.import_module("transformers.models.auto.modeling_auto")
    mapping = getattr(modeling_auto, TRANSFORMERS_MAPPINGS[task], {})
    name = mapping.get(model_type)
    return name if isinstance(name, str) else None


class _AutoClass:
    """Base of the Auto classes: not instantiated, only `from_pretrained` / `from_config`."""

    task: ClassVar[str]

    def __init__(self, *args, **kwargs):
        raise OSError(
            f"{type(self).__name__} is not meant to be instantiated; use "
            f"{type(self).__name__}.from_pretrained(path_or_hub_id) or .from_config(config)."
        )

    @classmethod
    def from_pretrained(cls, name_or_path, **kwargs):
        """Load a Hugging Face checkpoint (directory or hub id) into a flaxauto model.

        Keywords: dtype (compute), param_dtype (storage), mesh and rules (place each tensor in its
        shards as it is read), ignore_mismatched_sizes, output_loading_info, progress, seed,
        revision / cache_dir / token / local_files_only (hub), and config overrides such as
        num_labels, id2label, problem_type.
        """
        from flaxauto import modeling

        return modeling.from_pretrained(name_or_path, cls.task, **kwargs)

    @classmethod
    def from_config(cls, config, **kwargs):
        """A randomly initialised model (transformers' init rules) for a transformers config."""
        from flaxauto import modeling

        return modeling.from_config(config, cls.task, **kwargs)


def _auto_class(name: str) -> type:
    task = AUTO_CLASS_TASKS[name]
    doc = f"The {name} of transformers, in JAX: builds the model for task {task!r}."
    return type(name, (_AutoClass,), {"task": task, "__doc__": doc, "__module__": __name__})


AutoModel = _auto_class("AutoModel")
AutoModelForSequenceClassification = _auto_class("AutoModelForSequenceClassification")
AutoModelForTokenClassification = _auto_class("AutoModelForTokenClassification")
AutoModelForQuestionAnswering = _auto_class("AutoModelForQuestionAnswering")
AutoModelForMaskedLM = _auto_class("AutoModelForMaskedLM")
AutoModelForCausalLM = _auto_class("AutoModelForCausalLM")
AutoModelForSeq2SeqLM = _auto_class("AutoModelForSeq2SeqLM")
AutoModelForMultipleChoice = _auto_class("AutoModelForMultipleChoice")
AutoModelForNextSentencePrediction = _auto_class("AutoModelForNextSentencePrediction")
AutoModelForImageClassification = _auto_class("AutoModelForImageClassification")
AutoModelForAudioClassification = _auto_class("AutoModelForAudioClassification")
AutoModelForSpeechSeq2Seq = _auto_class("AutoModelForSpeechSeq2Seq")
AutoModelForVideoClassification = _auto_class("AutoModelForVideoClassification")
AutoModelForObjectDetection = _auto_class("AutoModelForObjectDetection")
AutoModelForTableQuestionAnswering = _auto_class("AutoModelForTableQuestionAnswering")
