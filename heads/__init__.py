"""Generic task heads, shared by every family (installed as `flaxauto.heads`)."""

from flaxauto.heads.base import Head, PooledProjection, pool
from flaxauto.heads.classification import (
    MultipleChoiceHead,
    NextSentencePredictionHead,
    QuestionAnsweringHead,
    SequenceClassificationHead,
    TokenClassificationHead,
)
from flaxauto.heads.detection import ObjectDetectionHead, post_process_object_detection
from flaxauto.heads.language_modeling import CausalLMHead, MaskedLMHead
from flaxauto.heads.seq2seq import (
    Seq2SeqLMHead,
    Seq2SeqQuestionAnsweringHead,
    Seq2SeqSequenceClassificationHead,
)
from flaxauto.heads.vision import DistilledImageClassificationHead, ImageClassificationHead

__all__ = [
    "CausalLMHead",
    "DistilledImageClassificationHead",
    "Head",
    "ImageClassificationHead",
    "MaskedLMHead",
    "MultipleChoiceHead",
    "NextSentencePredictionHead",
    "ObjectDetectionHead",
    "PooledProjection",
    "QuestionAnsweringHead",
    "Seq2SeqLMHead",
    "Seq2SeqQuestionAnsweringHead",
    "Seq2SeqSequenceClassificationHead",
    "SequenceClassificationHead",
    "TokenClassificationHead",
    "pool",
    "post_process_object_detection",
]
