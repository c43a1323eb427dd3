"""Make the transformers 4 Flax fixtures in tests/fixtures/flax/ (committed; a few KB each).

transformers 5 has no Flax models, so these checkpoints are written by transformers 4's Flax
classes. Rerun with (from the repository root):

    python3 -m venv /tmp/venv-tf4
    /tmp/venv-tf4/bin/pip install transformers==4.46.3 flax==0.10.2 jax==0.4.38 \
        jaxlib==0.4.38 'torch==2.13.*' safetensors
    /tmp/venv-tf4/bin/python tests/make_flax_fixtures.py

For each family that transformers 4 had Flax classes for (Qwen2 had none), one tiny task model,
every parameter drawn at random (seeded), saved by the Flax class's own save_pretrained as:
  msgpack/      flax_model.msgpack
  sharded/      flax_model-0000i-of-0000n.msgpack + flax_model.msgpack.index.json
  safetensors/  model.safetensors with metadata format: flax
  pytorch/      the PyTorch twin: transformers 4's PyTorch class loading the msgpack with
                from_flax=True (its own Flax -> PyTorch conversion), saved as safetensors.
tests/test_flax_checkpoints.py loads each Flax folder with flaxauto and compares it with the twin
run live by transformers 5's PyTorch model: the references are never stored.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import jax
import numpy as np
import transformers
from flax.traverse_util import flatten_dict, unflatten_dict

ROOT = Path(__file__).resolve().parent / "fixtures" / "flax"

_ENCODER = dict(
    vocab_size=40, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
    intermediate_size=12, max_position_embeddings=24, num_labels=3,
)  # fmt: skip
_DECODER = dict(
    vocab_size=40, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
    intermediate_size=12, max_position_embeddings=24, pad_token_id=0, bos_token_id=1,
    eos_token_id=2,
)  # fmt: skip

#: family -> (Flax class, PyTorch class, config)
FAMILIES = {
    "bert": ("FlaxBertForMaskedLM", "BertForMaskedLM", transformers.BertConfig(**_ENCODER)),
    "roberta": (
        "FlaxRobertaForSequenceClassification",
        "RobertaForSequenceClassification",
        transformers.RobertaConfig(**_ENCODER, type_vocab_size=1, pad_token_id=1),
    ),
    "xlm-roberta": (
        "FlaxXLMRobertaForTokenClassification",
        "XLMRobertaForTokenClassification",
        transformers.XLMRobertaConfig(**_ENCODER, type_vocab_size=1, pad_token_id=1),
    ),
    "distilbert": (
        "FlaxDistilBertForSequenceClassification",
        "DistilBertForSequenceClassification",
        transformers.DistilBertConfig(
            vocab_size=40, dim=8, n_layers=2, n_heads=2, hidden_dim=12, max_position_embeddings=24
        ),
    ),
    "gpt2": (
        "FlaxGPT2LMHeadModel",
        "GPT2LMHeadModel",
        transformers.GPT2Config(vocab_size=40, n_embd=8, n_layer=2, n_head=2, n_positions=24),
    ),
    "llama": (
        "FlaxLlamaForCausalLM",
        "LlamaForCausalLM",
        transformers.LlamaConfig(**_DECODER, num_key_value_heads=1, tie_word_embeddings=False),
    ),
    "mistral": (
        "FlaxMistralModel",
        "MistralModel",
        transformers.MistralConfig(**_DECODER, num_key_value_heads=1, sliding_window=64),
    ),
}


def _randomized(params, seed: int):
    """Every tensor random (init leaves biases 0 and norm scales 1, hiding layout mistakes)."""
    rng = np.random.default_rng(seed)
    flat = flatten_dict(params)
    noisy = {k: (v + 0.3 * rng.standard_normal(v.shape)).astype(v.dtype) for k, v in flat.items()}
    return unflatten_dict(noisy)


def main() -> None:
    shutil.rmtree(ROOT, ignore_errors=True)
    for seed, (family, (flax_name, torch_name, config)) in enumerate(FAMILIES.items()):
        model = getattr(transformers, flax_name)(config, seed=seed)
        params = _randomized(jax.device_get(model.params), seed)
        folder = ROOT / family
        model.save_pretrained(folder / "msgpack", params=params)
        model.save_pretrained(folder / "sharded", params=params, max_shard_size="3KB")
        model.save_pretrained(folder / "safetensors", params=params, safe_serialization=True)
        twin = getattr(transformers, torch_name).from_pretrained(folder / "msgpack", from_flax=True)
        twin.save_pretrained(folder / "pytorch", safe_serialization=True)
        assert len(list((folder / "sharded").glob("flax_model-*.msgpack"))) > 1
        print(family, sorted(p.name for p in folder.rglob("*") if p.is_file()))


if __name__ == "__main__":
    main()
