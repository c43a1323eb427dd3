"""Declared inputs: which keywords a model accepts, and what becomes of each one.

A backbone declares its inputs in its `__call__` signature: keyword-only parameters, no
`**kwargs`. A parameter whose default is a bool is a static flag (`output_hidden_states`); every
other one is data (arrays, or pytrees such as a KV cache or `encoder_outputs`). A head declares
its `label_names`, any further `input_names` it reads, and the flags it needs from the backbone.

`sort_inputs` runs in Python each time a model is called or traced under jit: array-like data is
converted with jnp.asarray, pytrees and flags pass through untouched, a keyword nobody declared
raises TypeError naming it, and a transformers keyword flaxauto does not implement raises
NotImplementedError naming it.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import numbers
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

#: Flags that default to the config's value when not passed, as in transformers 5 (where a flag
#: passed as None is off, like its default).
CONFIG_DEFAULT_FLAGS = ("output_hidden_states", "output_attentions")

#: transformers keywords flaxauto does not implement -> what to do instead.
NOT_IMPLEMENTED = {
    "head_mask": "masking attention heads is not implemented",
    "decoder_head_mask": "masking attention heads is not implemented",
    "cross_attn_head_mask": "masking attention heads is not implemented",
    "past_key_values": "flaxauto's KV cache is `cache=`: cache=model.init_cache(batch, max_length)",
    "cache_position": "new tokens go to slot cache.length; pass position_ids for their positions",
    "logits_to_keep": "slice the returned logits instead",
    "num_logits_to_keep": "slice the returned logits instead",
    "encoder_hidden_states": "cross-attention is not implemented for this model",
    "encoder_attention_mask": "cross-attention is not implemented for this model",
}

#: Keywords of the old Flax models (transformers < 5) -> the flaxauto way.
OLD_FLAX_KEYWORDS = {
    "train": "model.train() turns dropout on, model.eval() off",
    "deterministic": "model.train() turns dropout on, model.eval() off",
    "dropout_rng": "dropout draws from the model's own RNG streams (seeded by from_pretrained's "
    "seed=)",
    "params": "a model carries its parameters; for a pure function use nnx.split / nnx.merge",
}


@dataclass(frozen=True)
class BackboneInputs:
    """What a backbone class declares: its data inputs and its static flags with defaults."""

    data: frozenset[str]
    flags: dict[str, bool]


@functools.cache
def backbone_inputs(backbone_class: type, method: str = "__call__") -> BackboneInputs:
    """Read once per class from `__call__`'s signature (or another method's: an
    encoder-decoder's `encode`)."""
    signature = inspect.signature(getattr(backbone_class, method))
    data, flags = set(), {}
    for name, parameter in list(signature.parameters.items())[1:]:  # past self
        if parameter.kind is inspect.Parameter.VAR_KEYWORD:
            raise TypeError(
                f"{backbone_class.__name__}.{method} takes **{name}: a backbone declares every "
                "input and flag as a keyword-only parameter"
            )
        if parameter.kind is not inspect.Parameter.KEYWORD_ONLY:
            raise TypeError(
                f"{backbone_class.__name__}.{method}: {name!r} must be keyword-only (after `*`)"
            )
        if isinstance(parameter.default, bool):
            flags[name] = parameter.default
        else:
            data.add(name)
    return BackboneInputs(frozenset(data), flags)


@dataclass
class SortedInputs:
    """One call's keywords, sorted: `data` for the backbone (before the head's prepare_inputs),
    `flags` for the backbone, `labels` and `head_inputs` for the head only."""

    data: dict[str, Any]
    flags: dict[str, bool]
    labels: dict[str, Any]
    head_inputs: dict[str, Any]


def sort_inputs(kwargs: dict[str, Any], backbone, head, config) -> SortedInputs:
    """Check one call's keywords against what the backbone and head declare and sort them.
    Flags: the caller's, else the config's (output_*), else the backbone's default; then what
    the head needs overrides them."""
    declared = backbone_inputs(type(backbone))
    label_names = tuple(head.label_names) if head is not None else ()
    head_names = tuple(getattr(head, "input_names", ())) if head is not None else ()
    kwargs = _drop_harmless(dict(kwargs), declared, type(backbone).__name__)
    accepted = declared.data | set(declared.flags) | set(label_names) | set(head_names)
    _refuse_unknown(kwargs, accepted, type(backbone).__name__, head)

    flags = {}
    for name, default in declared.flags.items():
        if name not in kwargs and name in CONFIG_DEFAULT_FLAGS:
            flags[name] = bool(getattr(config, name, default))
        else:
            flags[name] = static_flag(name, kwargs.pop(name, None), default)
    if head is not None:
        needed = head.backbone_flags()
        unknown = set(needed) - set(declared.flags)
        if unknown:
            raise TypeError(
                f"{type(head).__name__} needs flag(s) {sorted(unknown)} that "
                f"{type(backbone).__name__} does not take"
            )
        flags.update(needed)
    labels = {k: to_array(kwargs.pop(k)) for k in label_names if k in kwargs}
    head_inputs = {
        k: to_array(kwargs.pop(k)) for k in head_names if k in kwargs and k not in declared.data
    }
    data = {k: to_array(v) for k, v in kwargs.items()}
    return SortedInputs(data=data, flags=flags, labels=labels, head_inputs=head_inputs)


def _drop_harmless(kwargs: dict, declared: BackboneInputs, owner: str) -> dict:
    """transformers keywords whose values flaxauto already honours are dropped; other values of
    them are refused, naming them."""
    if "return_dict" not in declared.data and kwargs.pop("return_dict", None) not in (None, True):
        raise NotImplementedError(
            "return_dict=False is not implemented: flaxauto returns output dataclasses; "
            "read fields by name (out.logits or out['logits'])"
        )
    if "use_cache" not in declared.data and "use_cache" in kwargs:
        use_cache = kwargs.pop("use_cache")
        # with a cache given, the output carries the new one; an encoder has none: ignored
        if use_cache and "cache" in declared.data and kwargs.get("cache") is None:
            raise NotImplementedError(
                f"use_cache=True is not implemented for {owner}: pass "
                "cache=model.init_cache(batch, max_length); the output carries the new cache"
            )
    return kwargs


def _refuse_unknown(kwargs: dict, accepted: set[str], owner: str, head) -> None:
    unknown = sorted(set(kwargs) - accepted)
    if not unknown:
        return
    not_implemented = [k for k in unknown if k in NOT_IMPLEMENTED]
    if not_implemented:
        raise NotImplementedError(
            "; ".join(f"{k}= is not implemented ({NOT_IMPLEMENTED[k]})" for k in not_implemented)
        )
    takers = owner + ("" if head is None else f" and {type(head).__name__}")
    reasons = []
    for name in unknown:
        hint = OLD_FLAX_KEYWORDS.get(name)
        if hint is None:
            close = difflib.get_close_matches(name, sorted(accepted), n=1)
            hint = f"did you mean {close[0]!r}?" if close else None
        reasons.append(f"{name!r}" + (f" ({hint})" if hint else ""))
    raise TypeError(
        f"unexpected keyword argument(s) {', '.join(reasons)}: neither {takers} accepts "
        f"{'it' if len(unknown) == 1 else 'them'}. Accepted: {', '.join(sorted(accepted))}"
    )


def static_flag(name: str, value, default: bool) -> bool:
    """A flag picks which program runs, so it must be a Python bool, not an array."""
    if value is None:
        return default
    if isinstance(value, bool | np.bool_):
        return bool(value)
    if isinstance(value, int | list | tuple):  # transformers 5 selects hidden states by index
        raise NotImplementedError(
            f"{name}={value!r}: selecting by index is not implemented; pass True and index the "
            "returned tuple"
        )
    raise TypeError(
        f"{name} is a static flag: pass True or False, not {type(value).__name__} (under jit, "
        "close over it rather than passing it as a traced argument)"
    )


def to_array(value):
    """Arrays and nested lists of numbers become jax arrays; None, bools and pytrees (a list of
    dicts, a dataclass such as a cache or encoder outputs) are returned untouched. (Under jit a
    list of numbers arrives as a list of scalar tracers: converted too.)"""
    if isinstance(value, jax.Array | np.ndarray | np.generic):
        return jnp.asarray(value)
    if _is_number(value) or (isinstance(value, list | tuple) and _numbers_only(value)):
        return jnp.asarray(value)
    return value


def _is_number(value) -> bool:
    return isinstance(value, numbers.Number) and not isinstance(value, bool)


def _numbers_only(value) -> bool:
    if isinstance(value, list | tuple):
        return len(value) > 0 and all(_numbers_only(item) for item in value)
    scalar_array = isinstance(value, jax.Array | np.ndarray) and value.ndim == 0
    return _is_number(value) or isinstance(value, np.generic) or scalar_array


# --- from_pretrained keywords -------------------------------------------------------------------

#: transformers from_pretrained keywords that are not config overrides: value(s) flaxauto already
#: honours (accepted and dropped), and what to do instead of any other value.
LOADING_KEYWORDS: dict[str, tuple[tuple, str]] = {
    "torch_dtype": ((None,), "use dtype= (compute) and param_dtype= (storage)"),
    "device_map": ((None,), "place parameters with mesh= and rules="),
    "max_memory": ((None,), "place parameters with mesh= and rules="),
    "tp_plan": ((None,), "use mesh= and rules='tensor'"),
    "offload_folder": ((None,), "flaxauto does not offload parameters"),
    "offload_state_dict": ((None, False), "flaxauto does not offload parameters"),
    "low_cpu_mem_usage": ((None, True, False), ""),  # flaxauto always streams tensor by tensor
    "quantization_config": ((None,), "quantized checkpoints are not implemented"),
    "gguf_file": ((None,), "GGUF files are not implemented"),
    "from_tf": ((None, False), "TensorFlow checkpoints are not implemented"),
    "from_flax": ((None, False), "Flax msgpack checkpoints are not implemented"),
    "state_dict": ((None,), "save the tensors with save_pretrained and load that folder"),
    "use_safetensors": ((None,), "flaxauto reads model.safetensors, else pytorch_model.bin"),
    "key_mapping": ((None,), "register the family with renames="),
    "trust_remote_code": ((None, False), "flaxauto runs no code from a checkpoint"),
    "code_revision": ((None,), "flaxauto runs no code from a checkpoint"),
    "force_download": ((None, False), "delete the files from the Hugging Face cache"),
    "resume_download": ((None, True, False), ""),  # deprecated in huggingface_hub: no effect
    "proxies": ((None,), "set HTTPS_PROXY for huggingface_hub"),
}


def refuse_loading_keywords(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Drop the transformers loading keywords whose values flaxauto honours; raise
    NotImplementedError naming any other. Returns the rest (config overrides, to be checked)."""
    rest = {}
    for name, value in kwargs.items():
        if name not in LOADING_KEYWORDS:
            rest[name] = value
            continue
        accepted, instead = LOADING_KEYWORDS[name]
        if not any(value is a or (isinstance(a, str) and value == a) for a in accepted):
            raise NotImplementedError(f"{name}={value!r} is not implemented: {instead}")
    return rest


def refuse_unused_config_keywords(unused: dict[str, Any], config) -> None:
    """What transformers' config did not take is no option of from_pretrained either."""
    if unused:
        names = sorted(unused)
        raise TypeError(
            f"from_pretrained got unexpected keyword argument(s) {', '.join(map(repr, names))}: "
            f"neither a flaxauto option nor an attribute of {type(config).__name__}"
        )
