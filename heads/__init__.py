"""Generic task heads, shared by every family (installed as `flaxauto.heads`)."""

from flaxauto.heads.base import Head, PooledProjection, pool
from flaxauto.heads.classification import (
    MultipleChoiceHead,
    NextSentencePredictionHead,
    QuestionAnsweringHead,
    SequenceClassificationHead,
    TokenClassificationHead,
)
from flaxauto.heads.language_modeling import CausalLMHead, MaskedLMHead
from flaxauto.heads.vision import DistilledImageClassificationHead, ImageClassificationHead

__all__ = [
    "CausalLMHead",
    "DistilledImageClassificationHead",
    "Head",
    "ImageClassificationHead",
    "MaskedLMHead",
    "MultipleChoiceHead",
    "NextSentencePredictionHead",
    "PooledProjection",
    "QuestionAnsweringHead",
    "SequenceClassificationHead",
    "TokenClassificationHead",
    "pool",
]
