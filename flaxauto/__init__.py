"""flaxauto: Hugging Face's Auto model classes, natively in JAX / Flax NNX.

model = flaxauto.AutoModelForSequenceClassification.from_pretrained("path/or/hub-id")
logits = jax.jit(lambda m, x: m(**x).logits)(model, batch)
model.save_pretrained("out/")   # loads back into transformers (PyTorch)
"""

from flaxauto.auto import (
    AutoModel,
    AutoModelForAudioClassification,
    AutoModelForCausalLM,
    AutoModelForCTC,
    AutoModelForImageClassification,
    AutoModelForMaskedLM,
    AutoModelForMultipleChoice,
    AutoModelForNextSentencePrediction,
    AutoModelForObjectDetection,
    AutoModelForQuestionAnswering,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoModelForSpeechSeq2Seq,
    AutoModelForTableQuestionAnswering,
    AutoModelForTokenClassification,
    AutoModelForVideoClassification,
)
from flaxauto.checkpoint import TrainingCheckpointer
from flaxauto.converters.errors import CheckpointError, UnsafeCheckpointError
from flaxauto.converters.flax_params import flax_params, load_flax_params
from flaxauto.heads.detection import post_process_object_detection
from flaxauto.heads.detection_losses import detection_loss, pad_detection_labels
from flaxauto.lora import load_lora, lora, merge_lora, save_lora
from flaxauto.modeling import Model
from flaxauto.pipelines import pipeline
from flaxauto.registry import AUTO_CLASS_TASKS, ConfigAttr, HeadSpec, register, supported
from flaxauto.sharding import make_mesh, replicate, shard_batch, shard_cache, shard_model

__version__ = "0.1.0"

__all__ = [
    "AUTO_CLASS_TASKS",
    "AutoModel",
    "AutoModelForAudioClassification",
    "AutoModelForCausalLM",
    "AutoModelForCTC",
    "AutoModelForImageClassification",
    "AutoModelForMaskedLM",
    "AutoModelForMultipleChoice",
    "AutoModelForNextSentencePrediction",
    "AutoModelForObjectDetection",
    "AutoModelForQuestionAnswering",
    "AutoModelForSeq2SeqLM",
    "AutoModelForSequenceClassification",
    "AutoModelForSpeechSeq2Seq",
    "AutoModelForTableQuestionAnswering",
    "AutoModelForTokenClassification",
    "AutoModelForVideoClassification",
    "CheckpointError",
    "ConfigAttr",
    "HeadSpec",
    "Model",
    "TrainingCheckpointer",
    "UnsafeCheckpointError",
    "detection_loss",
    "flax_params",
    "load_flax_params",
    "load_lora",
    "lora",
    "make_mesh",
    "merge_lora",
    "pad_detection_labels",
    "pipeline",
    "post_process_object_detection",
    "register",
    "replicate",
    "save_lora",
    "shard_batch",
    "shard_cache",
    "shard_model",
    "supported",
]
