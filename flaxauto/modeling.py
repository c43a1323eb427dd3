"""The model: backbone + head, built abstractly and filled from a checkpoint or initialised.

`from_pretrained` never random-initialises a weight the checkpoint provides: the model is built
abstractly (shapes only, see build_abstract), the loader streams tensors into it, and only what
the checkpoint lacks (a new head, a pooler) is initialised, by transformers' rules, and reported.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from flaxauto import config_checks, decoding, inputs, layers, registry
from flaxauto.converters.errors import CheckpointError
from flaxauto.converters.files import (
    GENERATION_CONFIG,
    open_tensors,
    resolve_checkpoint,
    save_safetensors,
)
from flaxauto.converters.layout import export_tensors, initial_value, parameter_slots
from flaxauto.converters.loader import LoadingInfo, is_floating, load_weights

logger = logging.getLogger("flaxauto")


class _Static:
    """Holds non-array model facts (config, family) as one static leaf that hashes by identity,
    so jit's cache does not compare whole configs on every call."""

    def __init__(self, **facts):
        self.__dict__.update(facts)

    def __hash__(self):
        return id(self)

    def __eq__(self, other):
        return self is other


class Model(nnx.Module):
    """A transformers model in Flax NNX: `backbone` (the family's base model) and `head`.

    Called with transformers' input names; returns transformers' output dataclasses. For
    AutoModel the head is None and the backbone output is returned.
    """

    def __init__(
        self,
        config,
        task: str,
        precision: layers.Precision,
        rngs: nnx.Rngs,
        *,
        scan_layers: bool = False,
        remat: bool = False,
        head_overrides: dict | None = None,
    ):
        family, spec = registry.lookup(config.model_type, task)
        config_checks.check_config_attributes(
            config, family.config_attributes, f"model_type {config.model_type!r}"
        )
        self.static = _Static(config=config, family=family, head_spec=spec, task=task)
        backbone_options = registry.resolve_options(spec.backbone_options, config)
        backbone_options |= _execution_options(family, scan_layers=scan_layers, remat=remat)
        self.backbone = family.backbone(config, precision, rngs, **backbone_options)
        if spec.head is None:
            self.head = nnx.data(None)
        else:
            head_options = registry.resolve_options(spec.options, config)
            self.head = spec.head(config, precision, rngs, **head_options | (head_overrides or {}))

    config = property(lambda self: self.static.config)
    family = property(lambda self: self.static.family)
    head_spec = property(lambda self: self.static.head_spec)
    task = property(lambda self: self.static.task)

    def __call__(self, *args, **kwargs):
        """Keywords are the backbone's declared inputs and flags and the head's labels (see
        flaxauto.inputs); the main input (input_ids, pixel_values, ...) may come first by
        position."""
        if len(args) > 1:
            raise TypeError("pass inputs by name, e.g. model(input_ids, attention_mask=mask)")
        if args:
            main = self.family.main_input_name
            if main in kwargs:
                raise TypeError(f"got {main} both by position and by name")
            kwargs[main] = args[0]
        kwargs = inputs.alias_past_key_values(kwargs)  # transformers' name for cache=
        call = inputs.sort_inputs(kwargs, self.backbone, self.head, self.config)
        with self._activation_sharding():
            if self.head is None:
                return self.backbone(**call.data, **call.flags)
            prepared = self.head.prepare_inputs(call.data, call.labels)
            features = self.backbone(**prepared, **call.flags)
            head_inputs = call.data | call.head_inputs
            return self.head(features, backbone=self.backbone, inputs=head_inputs, **call.labels)

    def _activation_sharding(self):
        """Activations traced under it carry sharding constraints from their logical axes, on
        the mesh the model was loaded onto or shard_model placed it on (see layers.constrain)."""
        mesh, rules = getattr(self.static, "placement", (None, None))
        if mesh is None:
            return layers.activation_sharding(None)
        from flaxauto.sharding import activation_placer

        return layers.activation_sharding(activation_placer(mesh, rules))

    def init_cache(self, batch_size: int, max_length: int, dtype=None, *, mesh=None, rules=None):
        """An empty KV cache of `max_length` slots (decoder families), for model(..., cache=):
        see flaxauto.decoder. On `mesh` (default: the one the model was loaded onto) its arrays
        are sharded by their logical axes and `rules`."""
        if not hasattr(self.backbone, "init_cache"):
            raise TypeError(f"{self.config.model_type} models take no KV cache")
        if mesh is None:
            mesh, rules = getattr(self.static, "placement", (None, None))
        return self.backbone.init_cache(batch_size, max_length, dtype, mesh=mesh, rules=rules)

    @property
    def generation_config(self):
        """transformers' GenerationConfig: the checkpoint's generation_config.json, else derived
        from the model config (as transformers does). Edit it in place to change defaults."""
        if getattr(self.static, "generation_config", None) is None:
            from transformers.generation.configuration_utils import GenerationConfig

            self.static.generation_config = GenerationConfig.from_model_config(self.config)
        return self.static.generation_config

    def generate(self, input_ids, attention_mask=None, *, generation_config=None, key=None, **kw):
        """Token ids [B * num_return_sequences, prompt + new] as transformers' generate returns
        them (a causal LM's prompt and its continuation; an encoder-decoder's decoder tokens,
        its input_ids being the encoder's): greedy, sampling or beam search, in one compiled
        program. See flaxauto.generation.generate."""
        from flaxauto import generation

        options = [name for name in getattr(self.head, "generation_options", ()) if name in kw]
        if options:  # a family's own generate keywords (Whisper's language=, task=)
            generation_config = copy.deepcopy(generation_config or self.generation_config)
            for name in options:
                setattr(generation_config, name, kw.pop(name))
        return generation.generate(
            self, input_ids, attention_mask, generation_config=generation_config, key=key, **kw
        )

    # The decoding protocol (see flaxauto.decoding), served by a generative head.

    def can_generate(self) -> bool:
        return isinstance(self.head, decoding.DecodingHead)

    def _decoding_head(self) -> decoding.DecodingHead:
        if not self.can_generate():
            raise TypeError(
                f"{self.config.model_type} ({self.task}) does not generate: its head does not "
                "implement the decoding protocol (a causal LM does)"
            )
        return self.head

    def start(self, prompt_ids, prompt_mask, *, cache_length: int, **encoder_inputs):
        """prompt_ids, prompt_mask [B, P] -> (DecodingState, next-token logits [B, V]); the
        cache holds cache_length tokens (and is sharded on the mesh the model was loaded onto)."""
        head = self._decoding_head()
        cache = self.init_cache(prompt_ids.shape[0], cache_length)
        with self._activation_sharding():
            return head.start(self.backbone, prompt_ids, prompt_mask, cache=cache, **encoder_inputs)

    def step(self, state: decoding.DecodingState, tokens):
        """One token per row (tokens [R]) -> (DecodingState, next-token logits [R, V])."""
        with self._activation_sharding():
            return self._decoding_head().step(self.backbone, state, tokens)

    def decoder_prompt(self, generation_config, batch_size: int, decoder_input_ids=None):
        """An encoder-decoder's decoder prompt for generate [B, P] (numpy int32): the decoder
        start token, or the caller's decoder_input_ids (see heads.seq2seq.Seq2SeqLMHead)."""
        return self._decoding_head().decoder_prompt(
            generation_config, batch_size, decoder_input_ids
        )

    def encoder_input_names(self) -> frozenset[str]:
        """The inputs an encoder-decoder's encoder takes (its backbone's `encode` keywords)."""
        return inputs.backbone_inputs(type(self.backbone), "encode").data

    def reorder(self, state: decoding.DecodingState, rows) -> decoding.DecodingState:
        """Row i of the new state is row rows[i] of `state` (rows [R'] int32)."""
        return state.reorder(rows)

    def num_parameters(self) -> int:
        return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(self, nnx.Param)))

    def save_pretrained(self, save_directory, *, max_shard_size: int | str = "5GB") -> list[Path]:
        """Write config.json and model.safetensors (sharded past max_shard_size) in transformers'
        names and layouts, crash-consistently: interrupted anywhere, the directory loads as
        wholly the earlier checkpoint or wholly this one (see converters.files.save_safetensors).
        Other files there (a tokenizer) are kept. The model's own config is not changed."""
        if jax.tree.leaves(nnx.state(self, nnx.LoRAParam)):
            raise ValueError(
                "the model has LoRA adapters: flaxauto.merge_lora(model) folds them into the "
                "weights before save_pretrained; flaxauto.save_lora(model, dir) saves them alone"
            )
        config = copy.deepcopy(self.config)
        architecture = registry.transformers_class_name(
            config.model_type, self.task, config.architectures
        )
        config.architectures = [architecture] if architecture else None
        param_dtypes = {x.dtype for x in jax.tree.leaves(nnx.state(self, nnx.Param))}
        if len(param_dtypes) == 1:
            config.dtype = str(np.dtype(param_dtypes.pop()))
        return save_safetensors(
            save_directory,
            export_tensors(self),
            max_shard_size=max_shard_size,
            metadata={"format": "pt"},
            extra_files=self._config_files(config),
            replaces=(GENERATION_CONFIG,),  # an earlier model's, stale beside this one
        )

    def _config_files(self, config) -> dict[str, str]:
        files = {"config.json": config.to_json_string(use_diff=True)}
        if self.can_generate():  # transformers saves one beside every generative model
            files[GENERATION_CONFIG] = self.generation_config.to_json_string(use_diff=True)
        return files


def _precision(dtype, param_dtype, attn_implementation=None) -> layers.Precision:
    if isinstance(param_dtype, str) and param_dtype == "auto":
        raise ValueError("param_dtype='auto' keeps a checkpoint's dtypes: use from_pretrained")
    param_dtype = jnp.dtype(param_dtype or jnp.float32)
    return layers.Precision(
        dtype=jnp.dtype(dtype or param_dtype),
        param_dtype=param_dtype,
        attention=layers.attention_implementation(attn_implementation),
    )


def _execution_options(family, **requested) -> dict:
    """scan_layers / remat for backbones that implement them; asking others is an error."""
    options = {name: True for name, on in requested.items() if on}
    for name in options:
        if not getattr(family.backbone, f"supports_{name}", False):
            raise NotImplementedError(
                f"{name}=True is not implemented for {', '.join(family.model_types)}"
            )
    return options


def build_abstract(
    config, task: str, precision: layers.Precision, head_overrides=None, **execution
) -> Model:
    """The model with every variable a ShapeDtypeStruct: no memory, no initialisation.

    Built without tracing: the layers' initialisers return shapes and the RNG streams are
    deferred (layers.abstract_rngs), so no jax program runs; initialize_abstract gives values.
    execution: scan_layers (stack the layers and run them with jax.lax.scan: compile time stays
    flat in depth) and remat (recompute each layer's activations in the backward pass)."""
    return Model(
        config, task, precision, layers.abstract_rngs(), head_overrides=head_overrides, **execution
    )


def initialize_abstract(model: Model, seed: int, mesh=None, rules=None) -> list[str]:
    """Give every still-abstract variable a value: checkpoint tensors by transformers' init
    rules, RNG streams keys from `seed`. Returns the PyTorch names of the tensors initialised."""
    from flaxauto.sharding import put, resolve_rules, variable_sharding

    # transformers' init scale: initializer_range, or init_std (BART, Whisper and their kin)
    scales = (getattr(model.config, name, None) for name in ("initializer_range", "init_std"))
    std = next((scale for scale in scales if scale is not None), 0.02)
    initialised, fresh = [], set()  # a stacked variable serves several slots: init it once
    for index, (name, slot) in enumerate(parameter_slots(model).items()):
        abstract = slot.variable.get_value()
        if layers.is_abstract(abstract):
            value = initial_value(slot, jax.random.fold_in(jax.random.key(seed), index), std)
            if mesh is not None:
                rules = resolve_rules(rules)
                value = put(value, variable_sharding(slot.variable, abstract.shape, mesh, rules))
            slot.variable.set_value(value)
            # a counter starts at zero and a computed table is computed, unremarked, as in
            # transformers
            if slot.part not in ("counter", "computed"):
                fresh.add(id(slot.variable))
        if id(slot.variable) in fresh:
            initialised.append(name)
    for index, (path, variable) in enumerate(nnx.iter_graph(model)):
        if isinstance(variable, nnx.Variable) and layers.is_abstract(variable.get_value()):
            value = _rng_state(variable, seed, index, path)
            if mesh is not None:  # all of a model's state on its mesh: jit refuses a mix
                value = put(value, NamedSharding(mesh, PartitionSpec()))
            variable.set_value(value)
    return initialised


def _rng_state(variable, seed: int, index: int, path):
    abstract = variable.get_value()  # shape [L] for the streams of stacked layers
    if isinstance(variable, nnx.RngKey):
        # Key bits from numpy's SeedSequence (a hash of seed and position), wrapped as keys:
        # deriving them with jax.random would compile several small XLA programs first, a
        # noticeable part of loading a model.
        shape = (*abstract.shape, *layers.key_data_shape())
        entropy = (seed & (2**64 - 1), index)  # SeedSequence takes no negative numbers
        bits = np.random.SeedSequence(entropy).generate_state(math.prod(shape), np.uint32)
        return jax.random.wrap_key_data(bits.reshape(shape))
    if isinstance(variable, nnx.RngCount):
        return jax.device_put(np.zeros(abstract.shape, np.uint32))
    name = ".".join(map(str, path))
    raise TypeError(
        f"cannot initialise {type(variable).__name__} at {name}: only checkpoint tensors "
        f"(converters.layout.PERSISTENT) and RNG streams are filled after an abstract build"
    )


def from_config(
    config,
    task: str,
    *,
    dtype=None,
    param_dtype=None,
    seed: int = 0,
    mesh=None,
    rules=None,
    scan_layers: bool = False,
    remat: bool = False,
    attn_implementation: str | None = None,
):
    """A randomly initialised model for a transformers config (transformers' init rules).
    attn_implementation: "eager", "fused" (jax.nn.dot_product_attention) or None: eager on
    CPU, fused on GPU/TPU (see layers.attention_implementation)."""
    precision = _precision(dtype, param_dtype, attn_implementation)
    model = build_abstract(config, task, precision, scan_layers=scan_layers, remat=remat)
    initialize_abstract(model, seed, mesh, rules)
    model.static.placement = (mesh, rules)  # where init_cache puts a cache by default
    model.eval()
    return model


def _read_model_type(config_path: Path) -> str:
    try:
        data = json.loads(config_path.read_text())
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{config_path}: not a readable config.json ({error})") from None
    if not isinstance(data, dict) or "model_type" not in data:
        raise CheckpointError(f"{config_path}: no model_type in config.json")
    return data["model_type"]


def from_pretrained(
    name_or_path,
    task: str,
    *,
    dtype=None,
    param_dtype=None,
    mesh=None,
    rules=None,
    ignore_mismatched_sizes: bool = False,
    output_loading_info: bool = False,
    progress: bool | None = None,
    seed: int = 0,
    scan_layers: bool = False,
    remat: bool = False,
    attn_implementation: str | None = None,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    token: str | None = None,
    local_files_only: bool | None = None,
    subfolder: str | None = None,
    variant: str | None = None,
    **config_overrides,
):
    import transformers

    config_overrides = inputs.refuse_loading_keywords(config_overrides)
    checkpoint = resolve_checkpoint(
        name_or_path,
        revision=revision,
        cache_dir=cache_dir,
        token=token,
        local_files_only=local_files_only,
        subfolder=subfolder,
        variant=variant,
    )
    registry.lookup(_read_model_type(checkpoint.config_path), task)  # a clear error before any work
    config, unused = transformers.AutoConfig.from_pretrained(
        checkpoint.directory, return_unused_kwargs=True, **config_overrides
    )
    inputs.refuse_unused_config_keywords(unused, config)
    keep_dtypes = isinstance(param_dtype, str) and param_dtype == "auto"
    if keep_dtypes:
        param_dtype = _checkpoint_float_dtype(checkpoint)
    precision = _precision(dtype, param_dtype, attn_implementation)
    model = build_abstract(
        config, task, precision, _carried_head(config, task, checkpoint),
        scan_layers=scan_layers, remat=remat,
    )  # fmt: skip
    if mesh is not None:
        from flaxauto.sharding import resolve_rules

        rules = resolve_rules(rules)
    with open_tensors(checkpoint) as source:
        info = load_weights(
            model,
            source,
            mesh=mesh,
            rules=rules,
            ignore_mismatched_sizes=ignore_mismatched_sizes,
            progress=progress,
            where=str(checkpoint.directory),
            keep_dtypes=keep_dtypes,
        )
    initialize_abstract(model, seed, mesh, rules)
    model.static.placement = (mesh, rules)  # where init_cache puts a cache by default
    _report(model, info)
    model.eval()
    if checkpoint.generation_config_path is not None and model.can_generate():
        from transformers.generation.configuration_utils import GenerationConfig

        path = checkpoint.generation_config_path
        model.static.generation_config = GenerationConfig.from_pretrained(
            path.parent, config_file_name=path.name
        )
    return (model, info.as_dict()) if output_loading_info else model


def _carried_head(config, task: str, checkpoint) -> dict | None:
    """Head options the checkpoint decides: a head declared `untie_if_differs` (mT5's lm_head)
    is built untied when the file carries its own tensor with values apart from the table it
    ties to, which transformers 5 then loads instead of tying it (its MT5Config forces
    tie_word_embeddings=True, but tied tables whose files hold different values are left
    untied). Reads the two tensors, before any parameter is loaded."""
    _, spec = registry.lookup(config.model_type, task)
    if not spec.options.get("untie_if_differs"):
        return None
    carried, table = spec.options["untie_if_differs"]
    with open_tensors(checkpoint) as source:
        keys = set(source.keys())
        if carried not in keys:
            return None
        if table in keys and np.array_equal(source.read(carried), source.read(table)):
            return None  # one table under two names: tied, as transformers ties it
    _warn_once(
        f"{config.model_type}: the checkpoint carries its own {carried}; loaded as the lm_head "
        "(untied from the token table), as transformers 5 loads it, although the config says "
        "tie_word_embeddings=True"
    )
    return {"tied": False}


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        logger.warning(message)


def _checkpoint_float_dtype(checkpoint) -> np.dtype:
    """param_dtype="auto": the floating dtype most of the checkpoint's bytes have (float32 if it
    has none): the storage of what the checkpoint lacks, and the compute dtype unless given.
    Reads headers only (safetensors, .bin)."""
    sizes: dict[np.dtype, int] = {}
    with open_tensors(checkpoint) as source:
        for key in source.keys():
            kind = source.dtype(key)
            if is_floating(kind):
                sizes[kind] = sizes.get(kind, 0) + math.prod(source.shape(key)) * kind.itemsize
    return max(sizes, key=sizes.get) if sizes else np.dtype(np.float32)


def _report(model: Model, info: LoadingInfo) -> None:
    name = registry.TASK_AUTO_CLASSES[model.task]
    if info.missing_keys:
        logger.warning(
            "%s (%s): newly initialised, not in the checkpoint (train before use): %s",
            name,
            model.config.model_type,
            ", ".join(info.missing_keys),
        )
    if info.mismatched_keys:
        logger.warning(
            "%s: re-initialised because their shapes differ (ignore_mismatched_sizes): %s",
            name,
            ", ".join(f"{k} {old}->{new}" for k, old, new in info.mismatched_keys),
        )
    if info.unexpected_keys:
        logger.warning(
            "%s: checkpoint tensors this task does not use were dropped: %s",
            name,
            ", ".join(info.unexpected_keys),
        )
