"""Live references for the tests: tiny seeded transformers PyTorch models, their checkpoints and
inputs. Every number a test checks is computed here from PyTorch, never typed in."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import transformers

import flaxauto
from flaxauto.registry import transformers_class_name

#: A tiny config per model_type: small enough to run every head in seconds.
TINY_CONFIGS = {
    "bert": dict(
        vocab_size=99,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        max_position_embeddings=64,
        type_vocab_size=3,
        num_labels=3,
    ),
}
TINY_CONFIGS["roberta"] = dict(TINY_CONFIGS["bert"], type_vocab_size=2, pad_token_id=1)
TINY_CONFIGS["xlm-roberta"] = dict(TINY_CONFIGS["roberta"])
TINY_CONFIGS["distilbert"] = dict(
    vocab_size=99, dim=32, n_layers=2, n_heads=4, hidden_dim=37, max_position_embeddings=64,
    num_labels=3,
)  # fmt: skip

_DECODER = dict(vocab_size=99, pad_token_id=0, bos_token_id=1, eos_token_id=2, num_labels=3)
_LLAMA = dict(
    _DECODER, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
    max_position_embeddings=64,
)  # fmt: skip
TINY_CONFIGS["gpt2"] = dict(_DECODER, n_embd=32, n_layer=2, n_head=4, n_inner=37, n_positions=64)
# grouped-query attention, head_dim != hidden / heads, every bias, untied lm_head
TINY_CONFIGS["llama"] = dict(
    _LLAMA, num_key_value_heads=2, head_dim=16, attention_bias=True, mlp_bias=True
)
# multi-query attention, a sliding window shorter than the inputs
TINY_CONFIGS["mistral"] = dict(_LLAMA, num_key_value_heads=1, sliding_window=4)
# a full-attention layer then a sliding one; tied lm_head
TINY_CONFIGS["qwen2"] = dict(
    _LLAMA, num_key_value_heads=2, use_sliding_window=True, sliding_window=4,
    max_window_layers=1, tie_word_embeddings=True,
)  # fmt: skip

#: Decoders are fed left-padded batches (as for generation). A padding position is a query with
#: nothing to attend to, so its outputs are undefined: tests compare real tokens only.
DECODERS = {"gpt2", "llama", "mistral", "qwen2"}

#: Families whose backbone takes token_type_ids.
USES_TOKEN_TYPES = {"bert", "roberta", "xlm-roberta"}

#: Output fields compared per task.
TASK_FIELDS = {
    "base": ("last_hidden_state", "pooler_output"),
    "question-answering": ("start_logits", "end_logits"),
}

BATCH, CHOICES, LENGTH = 4, 2, 9


def tiny_config(model_type: str, task: str = "base", **overrides):
    kwargs = dict(TINY_CONFIGS[model_type])
    if task == "question-answering":
        kwargs["num_labels"] = 2  # start and end
    kwargs.update(overrides)
    return transformers.AutoConfig.for_model(model_type, **kwargs)


def torch_class(model_type: str, task: str):
    return getattr(transformers, transformers_class_name(model_type, task))


def torch_model(model_type: str, task: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    config = tiny_config(model_type, task, **overrides)
    # eager attention: the reference may be asked for attention probabilities
    config._attn_implementation = "eager"
    model = torch_class(model_type, task)(config).eval()
    _randomize_zero_initialised(model)
    return model


def _randomize_zero_initialised(model) -> None:
    """transformers initialises biases to 0 and norms to 1; a parity test must see them move."""
    generator = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for name, param in model.named_parameters():
            norm = "norm" in name.lower() or name.startswith("ln_") or ".ln_" in name
            if name.endswith("bias") or norm:
                param.add_(0.1 * torch.randn(param.shape, generator=generator))


def text_inputs(model_type: str, task: str, seed: int = 0) -> dict[str, np.ndarray]:
    """A right-padded batch (padding is the pad token, as tokenizers pad) with token types;
    multiple choice gets [B, C, T]."""
    rng = np.random.default_rng(seed)
    config = TINY_CONFIGS[model_type]
    pad = config.get("pad_token_id", 0)
    shape = (BATCH, CHOICES, LENGTH) if task == "multiple-choice" else (BATCH, LENGTH)
    lengths = rng.integers(3, LENGTH + 1, size=shape[:-1])
    lengths.flat[0] = LENGTH  # at least one sequence without padding
    mask = (np.arange(LENGTH) < lengths[..., None]).astype(np.int64)
    if model_type in DECODERS:
        mask = mask[..., ::-1].copy()  # left padding
    ids = np.where(mask == 1, rng.integers(2, config["vocab_size"], size=shape), pad)
    inputs = {"input_ids": ids, "attention_mask": mask}
    if model_type in USES_TOKEN_TYPES:
        inputs["token_type_ids"] = rng.integers(0, config["type_vocab_size"], size=shape) * mask
    return inputs


def task_labels(model, task: str, inputs, seed: int = 0) -> dict[str, np.ndarray]:
    """Labels of the right kind for a task (some ignored with -100 where the task allows it)."""
    rng = np.random.default_rng(seed + 1)
    config = model.config
    ids = inputs["input_ids"]
    if task == "sequence-classification":
        return {"labels": rng.integers(0, config.num_labels, size=ids.shape[0])}
    if task in ("token-classification", "masked-lm"):
        high = config.num_labels if task == "token-classification" else config.vocab_size
        labels = rng.integers(0, high, size=ids.shape)
        labels[inputs["attention_mask"] == 0] = -100
        return {"labels": labels}
    if task == "causal-lm":  # shifted inside the model: no target at or just after padding
        mask = inputs["attention_mask"]
        labels = rng.integers(0, config.vocab_size, size=ids.shape)
        labels[mask == 0] = -100
        labels[:, 1:][mask[:, :-1] == 0] = -100
        return {"labels": labels}
    if task == "multiple-choice":
        return {"labels": rng.integers(0, ids.shape[1], size=ids.shape[0])}
    if task == "next-sentence-prediction":
        return {"labels": rng.integers(0, 2, size=ids.shape[0])}
    if task == "question-answering":
        # one position past the end: transformers clamps it and ignores it
        starts = rng.integers(0, ids.shape[1], size=ids.shape[0])
        starts[0] = ids.shape[1] + 3
        return {
            "start_positions": starts,
            "end_positions": rng.integers(0, ids.shape[1], size=ids.shape[0]),
        }
    return {}


def run_torch(model, inputs, **kwargs) -> dict[str, np.ndarray | None]:
    with torch.no_grad():
        tensors = {k: torch.as_tensor(np.asarray(v)) for k, v in inputs.items()}
        out = model(**tensors, **kwargs)
    return out


def to_numpy(value):
    if value is None:
        return None
    if isinstance(value, tuple):
        return tuple(to_numpy(v) for v in value)
    if isinstance(value, torch.Tensor):
        return value.detach().float().numpy()
    return np.asarray(value, dtype=np.float32)


def max_diff(a, b) -> float:
    return float(np.max(np.abs(to_numpy(a) - to_numpy(b))))


def save_bin(model, directory: Path) -> Path:
    """A pytorch_model.bin checkpoint (transformers 5 writes only safetensors)."""
    directory.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(directory)
    torch.save(model.state_dict(), directory / "pytorch_model.bin")
    return directory


def task_pairs() -> list[tuple[str, str]]:
    """Every (model_type, task) the registry serves."""
    return [(mt, task) for mt, tasks in flaxauto.supported().items() for task in tasks]


@dataclass
class Case:
    """One (model_type, task): the PyTorch model, its checkpoints and reference outputs."""

    model_type: str
    task: str
    torch_model: object
    safetensors_dir: Path
    bin_dir: Path
    inputs: dict
    labels: dict
    reference: object  # the PyTorch output, with labels where the task has them

    @property
    def fields(self) -> tuple[str, ...]:
        fields = TASK_FIELDS.get(self.task, ("logits",))
        return tuple(f for f in fields if getattr(self.reference, f, None) is not None)

    def diff(self, field: str, ours, theirs) -> float:
        """max |ours - theirs|, over real tokens only for decoders (see DECODERS)."""
        ours, theirs = to_numpy(ours), to_numpy(theirs)
        if self.model_type in DECODERS:
            keep = self._real_tokens(field, theirs.shape)
            if keep is not None:
                ours, theirs = np.where(keep, ours, 0), np.where(keep, theirs, 0)
        return float(np.max(np.abs(ours - theirs)))

    def _real_tokens(self, field: str, shape) -> np.ndarray | None:
        """The attention mask shaped to broadcast over a per-token output, or None."""
        mask = self.inputs["attention_mask"].astype(bool)  # [B, T]
        if field == "attentions":
            return mask[:, None, :, None]  # [B, H, T (queries), S]
        if tuple(shape[:2]) == mask.shape:
            return mask.reshape(mask.shape + (1,) * (len(shape) - 2))
        return None  # one value per sequence

    @functools.cached_property
    def auto_class(self):
        return getattr(flaxauto, flaxauto.registry.TASK_AUTO_CLASSES[self.task])


def make_case(model_type: str, task: str, root: Path) -> Case:
    model = torch_model(model_type, task)
    safetensors_dir = root / "safetensors"
    model.save_pretrained(safetensors_dir)
    bin_dir = save_bin(model, root / "bin")
    inputs = text_inputs(model_type, task)
    labels = task_labels(model, task, inputs)
    reference = run_torch(model, {**inputs, **labels})
    return Case(model_type, task, model, safetensors_dir, bin_dir, inputs, labels, reference)


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def unsupported_model_type() -> str:
    """A model_type transformers knows and flaxauto does not (yet) implement."""
    known = set(flaxauto.supported())
    return next(t for t in ("xlnet", "ctrl", "fsmt", "reformer", "funnel") if t not in known)
