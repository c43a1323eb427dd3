"""The registry: model_type -> family, task -> head. The bottom layer: it imports nothing of
flaxauto, so families, heads, modeling and the Auto classes all build on it without a cycle.

Families register themselves at import (`flaxauto/models/<family>.py` ends with a `register(...)`
call). A built-in family's module is imported only when its model_type is first looked up, so
importing flaxauto stays cheap; a registration made by the user is never replaced by it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

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
    "AutoModelForCTC": "ctc",
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
    "ctc": "MODEL_FOR_CTC_MAPPING_NAMES",
}

#: built-in model_type -> the module under flaxauto.models that registers it
BUILTIN_FAMILIES: dict[str, str] = {
    "bert": "bert",
    "roberta": "roberta",
    "xlm-roberta": "roberta",
    "distilbert": "distilbert",
    "gpt2": "gpt2",
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "llama",
    "vit": "vit",
    "deit": "deit",
    "beit": "beit",
    "videomae": "videomae",
    "yolos": "yolos",
    "resnet": "resnet",
    "regnet": "regnet",
    "convnext": "convnext",
    "tapas": "tapas",
    "bart": "bart",
    "mbart": "mbart",
    "pegasus": "pegasus",
    "marian": "marian",
    "t5": "t5",
    "mt5": "t5",
    "umt5": "t5",
    "wav2vec2": "wav2vec2",
    "hubert": "wav2vec2",
    "whisper": "whisper",
    "detr": "detr",
}


@dataclass(frozen=True)
class ConfigAttr:
    """A head or backbone option read from the config when the model is built, e.g.
    `dropout_rate=ConfigAttr("seq_classif_dropout")`; `index` picks one item of a list
    attribute (`ConfigAttr("hidden_sizes", index=-1)`: the last stage's width)."""

    name: str
    index: int | None = None

    def resolve(self, config):
        value = getattr(config, self.name)
        return value if self.index is None else value[self.index]


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
    keys_to_ignore_on_save: the ends of PyTorch names (at a dot) save_pretrained does not write,
        as the transformers class's own _keys_to_ignore_on_save (MarianMTModel's sinusoids).
    """

    head: type | None
    names: Mapping[str, str] = field(default_factory=dict)
    options: Mapping[str, Any] = field(default_factory=dict)
    backbone_options: Mapping[str, Any] = field(default_factory=dict)
    base_model_prefix: str | None = None
    keys_to_ignore_on_save: tuple[str, ...] = ()


@dataclass(frozen=True)
class Family:
    model_types: tuple[str, ...]
    backbone: type
    base_model_prefix: str
    heads: Mapping[str, HeadSpec]
    #: backbone submodules a checkpoint may lack (initialised, reported) or carry unused (dropped)
    optional_modules: tuple[str, ...] = ()
    #: checkpoint-name exceptions, old -> current, applied to checkpoint keys before matching; a
    #: callable key -> key for spellings that follow a pattern (transformers 5's in-memory names)
    renames: Mapping[str, str] | Callable = field(default_factory=dict)
    #: the name of the backbone's first positional input
    main_input_name: str = "input_ids"
    #: tables shared inside the backbone: owner module -> the modules that use it under their own
    #: names ({"shared": ("encoder.embed_tokens", "decoder.embed_tokens")}); the model holds one
    #: table, a checkpoint may carry any of the names, save writes the owner's. A callable
    #: config -> mapping for ties that depend on the config (transformers' tie_word_embeddings)
    ties: Mapping[str, tuple[str, ...]] | Callable = field(default_factory=dict)
    #: checkpoint names dropped on load (the end of a name, at a dot): buffers older transformers
    #: versions saved, such as "rotary_emb.inv_freq" or "position_ids"
    ignored: tuple[str, ...] = ()
    #: config attributes the family implements (flaxauto.config_checks refuses any other set
    #: away from its default); None: not checked
    config_attributes: frozenset[str] | None = None
    #: checkpoint name -> the name transformers 5's PyTorch model holds it under in memory (what
    #: PEFT's target_modules and adapter files say), where the two differ: renames' inverse
    torch_names: Callable[[str], str] | None = None


_FAMILIES: dict[str, Family] = {}


def register(
    *,
    model_types: tuple[str, ...],
    backbone: type,
    base_model_prefix: str,
    heads: Mapping[str, HeadSpec],
    optional_modules: tuple[str, ...] = (),
    renames: Mapping[str, str] | Callable | None = None,
    main_input_name: str = "input_ids",
    ties: Mapping[str, tuple[str, ...]] | Callable | None = None,
    ignored: tuple[str, ...] = (),
    config_attributes: Iterable[str] | None = None,
    config_class: type | None = None,
    exist_ok: bool = False,
    torch_names: Callable[[str], str] | None = None,
) -> Family:
    """Add a family. Code outside flaxauto can call this too; pass `config_class` (a transformers
    PreTrainedConfig subclass) for a model_type transformers itself does not know. A model_type
    already registered is refused unless exist_ok=True. `config_attributes` names the config
    attributes the family implements; a config that sets any other away from its default is
    refused when a model is built (see flaxauto.config_checks)."""
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
        renames=renames if callable(renames) else dict(renames or {}),
        main_input_name=main_input_name,
        ties=ties if callable(ties) else MappingProxyType(dict(ties or {})),
        ignored=tuple(ignored),
        config_attributes=None if config_attributes is None else frozenset(config_attributes),
        torch_names=torch_names,
    )
    taken = [t for t in family.model_types if t in _FAMILIES]
    if _importing_builtin:  # a built-in import never replaces what is already registered
        family = dataclasses.replace(
            family, model_types=tuple(t for t in family.model_types if t not in taken)
        )
    elif taken and not exist_ok:
        raise ValueError(
            f"model_type(s) {taken} are already registered; pass exist_ok=True to replace them"
        )
    if config_class is not None:
        import transformers

        for model_type in family.model_types:
            transformers.AutoConfig.register(model_type, config_class, exist_ok=True)
    for model_type in family.model_types:
        _FAMILIES[model_type] = family
    return family


_importing_builtin = False


@contextlib.contextmanager
def _builtin_import():
    global _importing_builtin
    outer, _importing_builtin = _importing_builtin, True
    try:
        yield
    finally:
        _importing_builtin = outer


def _load_builtin(model_type: str) -> None:
    """Import the built-in module that serves model_type, unless it is registered already."""
    module = BUILTIN_FAMILIES.get(model_type)
    if module is not None and model_type not in _FAMILIES:
        with _builtin_import():
            importlib.import_module(f"flaxauto.models.{module}")


def supported() -> dict[str, tuple[str, ...]]:
    """model_type -> the tasks it serves, for every registered family."""
    for model_type in BUILTIN_FAMILIES:
        _load_builtin(model_type)
    return {model_type: tuple(family.heads) for model_type, family in sorted(_FAMILIES.items())}


def lookup(model_type: str, task: str) -> tuple[Family, HeadSpec]:
    """The family and head for (model_type, task), or an error naming what is supported."""
    _load_builtin(model_type)
    family = _FAMILIES.get(model_type)
    if family is not None and task in family.heads:
        return family, family.heads[task]
    auto_class = TASK_AUTO_CLASSES.get(task, task)
    serving = sorted(t for t, tasks in supported().items() if task in tasks)
    if family is None:
        raise ValueError(
            f"flaxauto has no model for model_type {model_type!r} (task {task!r}, {auto_class}). "
            f"Model types with {auto_class}: {', '.join(serving) or 'none yet'}."
        )
    raise ValueError(
        f"model_type {model_type!r} does not support task {task!r} ({auto_class}). "
        f"Model types with {auto_class}: {', '.join(serving) or 'none yet'}; "
        f"{model_type!r} supports: {', '.join(TASK_AUTO_CLASSES[t] for t in family.heads)}."
    )


def transformers_class_name(model_type: str, task: str, architectures=None) -> str | None:
    """The transformers PyTorch class that serves (model_type, task), e.g. BertForMaskedLM.
    Where transformers maps a task to several classes (deit's image classification, with or
    without the teacher), the one `architectures` names, else the first, as its Auto classes
    choose."""
    # Imported as a file, not through transformers' lazy package, which refuses without torch.
    modeling_auto = importlib.import_module("transformers.models.auto.modeling_auto")
    mapping = getattr(modeling_auto, TRANSFORMERS_MAPPINGS[task], {})
    name = mapping.get(model_type)
    if isinstance(name, tuple):
        return next((n for n in architectures or () if n in name), name[0])
    return name if isinstance(name, str) else None
