"""The Auto classes: the top layer, over the registry and the model.

`flaxauto.AutoModelForSequenceClassification.from_pretrained(path)` looks up the family of the
checkpoint's model_type and the head for the class's task, and builds the model.
"""

from __future__ import annotations

from typing import ClassVar

from flaxauto import modeling
from flaxauto.registry import AUTO_CLASS_TASKS


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

        Keywords: dtype (compute), param_dtype (storage; "auto" keeps the checkpoint's), mesh and
        rules (place each tensor in its shards as it is read), ignore_mismatched_sizes,
        output_loading_info, progress, seed,
        revision / cache_dir / token / local_files_only (hub), subfolder, variant, and config
        overrides such as num_labels, id2label, problem_type. Any other keyword raises.
        """
        return modeling.from_pretrained(name_or_path, cls.task, **kwargs)

    @classmethod
    def from_config(cls, config, **kwargs):
        """A randomly initialised model (transformers' init rules) for a transformers config."""
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
AutoModelForCTC = _auto_class("AutoModelForCTC")
