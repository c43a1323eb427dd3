"""Config whitelists: a family names the config attributes it implements; any other attribute
that is set away from its config class's default is refused, naming it.

transformers' config classes carry attributes for features a flaxauto family may not compute
(a new attention variant, pruned heads, an encoder-decoder switch); hub configs also carry keys
their class does not define, some of which the PyTorch code reads with getattr (`head_dim`,
`classifier_dropout`). Loading such a config silently would give different numbers from
transformers, so the check is a whitelist, not a list of known problems.

The check runs when a model is built (modeling.Model), for every family whose register() call
passes `config_attributes`.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

#: Attributes that never change what a forward pass computes, for any family: bookkeeping, label
#: names, runtime switches that flaxauto takes per call or ignores with the same result, the
#: initialisation scale (only newly initialised weights read it), and token ids that only
#: tokenizers and generation read. A family whose forward reads one of these (pad_token_id,
#: decoder_start_token_id) lists it itself; they are deliberately not here.
HARMLESS_ATTRIBUTES = frozenset({
    # bookkeeping
    "transformers_version", "architectures", "model_type", "name_or_path", "auto_map",
    "finetuning_task", "tokenizer_class", "prefix", "task_specific_params", "custom_pipelines",
    # labels (the heads read num_labels / problem_type where transformers does)
    "id2label", "label2id", "problem_type",
    # storage dtype: flaxauto's dtype / param_dtype options decide
    "dtype", "torch_dtype",
    # outputs: per-call flags (output_* default from the config), dataclass outputs, the cache
    "output_hidden_states", "output_attentions", "return_dict", "use_return_dict", "use_cache",
    "output_past", "torchscript",
    # memory-for-time trades with the same numbers
    "chunk_size_feed_forward", "gradient_checkpointing",
    # initialisation of new weights only
    "initializer_range", "initializer_factor",
    # token ids read by tokenizers and generation, not by these forwards
    "bos_token_id", "eos_token_id", "sep_token_id", "unk_token_id", "cls_token_id",
    "mask_token_id",
})  # fmt: skip


def check_config_attributes(config, implemented: Iterable[str] | None, owner: str) -> None:
    """Refuse every attribute of `config` that is neither implemented, harmless, nor at its
    class default. A key the config class does not define counts as set unless its value is
    None, False or empty (old configs carry e.g. "pruned_heads": {}). `implemented` may use the
    class's aliases (GPT-2's hidden_size for n_embd). None: the family declares no whitelist."""
    if implemented is None:
        return
    aliases = getattr(type(config), "attribute_map", {}) or {}
    allowed = HARMLESS_ATTRIBUTES | {aliases.get(name, name) for name in implemented}
    defaults = _class_defaults(type(config))
    refused = []
    for name, value in config.to_dict().items():
        # private keys are transformers' own bookkeeping (_name_or_path, _num_labels)
        if not (name.startswith("_") or name in allowed or _is_default(name, value, defaults)):
            refused.append(f"{name}={value!r}")
    if refused:
        raise NotImplementedError(
            f"{owner}: config setting(s) not implemented by flaxauto: {', '.join(refused)}. The "
            "family implements the attributes in its register(config_attributes=); others must "
            "keep their default, as their effect on the numbers is not computed"
        )


@functools.cache
def _class_defaults(config_class: type) -> dict:
    try:
        return config_class().to_dict()
    except Exception:  # a config class without defaults: every key is compared as unset
        return {}


def _is_default(name: str, value, defaults: dict) -> bool:
    if name in defaults:
        return value == defaults[name]
    return value is None or value is False or (isinstance(value, dict | list | tuple) and not value)
