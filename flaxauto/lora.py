"""LoRA adapters on flax's own nnx.LoRA, in PEFT's file format both ways.

    model = flaxauto.lora(model, r=8, alpha=16, target_modules=["query", "value"])
    optimizer = nnx.Optimizer(model, optax.adamw(1e-4), wrt=nnx.LoRAParam)  # adapters only
    flaxauto.save_lora(model, "adapter/")      # PeftModel.from_pretrained(torch_model, "adapter/")
    flaxauto.load_lora(model, "adapter/")      # also adapters peft saved
    flaxauto.merge_lora(model).save_pretrained("merged/")

A targeted linear layer (nnx.Linear, GPT-2's Conv1D) is replaced in place by a `LoRALinear`: an
nnx.LoRA whose base_module is the original layer, adding PEFT's update
`lora_B(lora_A(dropout(x))) * alpha / r` (alpha / sqrt(r) with use_rslora). A targeted
convolution (nnx.Conv: ResNet's, RegNet's, ConvNeXt's) becomes a `LoRAConv` in PEFT's form for
nn.Conv2d: lora_A a convolution with the base's kernel size, stride and padding into r channels,
lora_B a 1x1 convolution with the base's groups. The adapter matrices are nnx.LoRAParam (a
subclass of nnx.Param), so `wrt=nnx.LoRAParam` trains them alone; the base layer keeps its path
below `base_module`, which the converters skip when naming tensors.

Module names are transformers' PyTorch module names as the model holds them in memory, which
PEFT matches and writes: where transformers 5 renames a family's checkpoint names at load (ViT's
hub `encoder.layer.0.attention.attention.query` is `layers.0.attention.q_proj` in memory), the
family's `torch_names` gives the in-memory name. A target_modules entry matches a module whose
name is it or ends with "." + it; a string is a regular expression that must match the whole
name, as in PEFT.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flaxauto.converters.layout import parameter_slots
from flaxauto.sharding import shard_model

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
#: PEFT's key prefix for the wrapped model's modules
PEFT_PREFIX = "base_model.model."

#: PEFT task types by flaxauto task, written into adapter_config.json
PEFT_TASK_TYPES = {
    "causal-lm": "CAUSAL_LM",
    "sequence-classification": "SEQ_CLS",
    "token-classification": "TOKEN_CLS",
    "question-answering": "QUESTION_ANS",
    "seq2seq-lm": "SEQ_2_SEQ_LM",
    "base": "FEATURE_EXTRACTION",
}


#: modules PEFT saves beside the adapters for a task type (its modules_to_save default): the
#: head, usually new and trained in full
PEFT_HEAD_MODULES = {
    "sequence-classification": ("classifier", "score"),
    "token-classification": ("classifier", "score"),
    "question-answering": ("qa_outputs",),
}


class LoRALinear(nnx.LoRA):
    """nnx.LoRA around a linear layer with PEFT's dropout and scaling.

    lora_a [in, r] and lora_b [r, out] are PEFT's lora_A.weight [r, in] and lora_B.weight
    [out, r], transposed. `torch_name` is the wrapped layer's PyTorch module name."""

    def __init__(
        self,
        base: nnx.Linear,
        r: int,
        scaling: float,
        dropout: float,
        torch_name: str,
        rngs: nnx.Rngs,
    ):
        kernel_axes = base.kernel.get_metadata("out_sharding", None) or (None, None)
        in_axis, out_axis = kernel_axes
        bound = 1 / math.sqrt(base.in_features)  # PEFT: kaiming_uniform_(a=sqrt(5)) on [r, in]
        super().__init__(
            base.in_features,
            r,
            base.out_features,
            base_module=base,
            dtype=base.dtype,
            param_dtype=base.param_dtype,
            a_initializer=lambda key, shape, dtype: jax.random.uniform(
                key, shape, dtype, -bound, bound
            ),
            b_initializer=nnx.initializers.zeros,  # a fresh adapter changes nothing
            rngs=rngs,
            # logical axes as the base kernel's (placed by flaxauto.sharding, not by flax)
            a_metadata={"out_sharding": (in_axis, None), "eager_sharding": False},
            b_metadata={"out_sharding": (None, out_axis), "eager_sharding": False},
        )
        self.scaling = scaling
        self.dropout = nnx.Dropout(dropout, rngs=rngs)
        self.torch_name = torch_name

    def __call__(self, x: jax.Array) -> jax.Array:  # x [..., in] -> [..., out]
        base = self.base_module(x)
        dtype = base.dtype
        a, b = self.lora_a[...].astype(dtype), self.lora_b[...].astype(dtype)
        update = (self.dropout(x).astype(dtype) @ a) @ b
        return base + (update * self.scaling).astype(dtype)

    def delta(self) -> jax.Array:
        """The update to the base kernel [in, out] that merging adds."""
        return (self.lora_a[...].astype(jnp.float32) @ self.lora_b[...].astype(jnp.float32)) * (
            self.scaling
        )

    def to_peft(self, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """lora_a [in, r], lora_b [r, out] -> PEFT's lora_A.weight [r, in], lora_B.weight
        [out, r]."""
        return a.T, b.T

    def from_peft(self, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return a.T, b.T


class LoRAConv(nnx.LoRA):
    """nnx.LoRA around a convolution (channels last), as PEFT adapts torch's ConvNd: lora_a
    [*kernel, in, r] is a convolution with the base's kernel size, stride and padding (not its
    dilation, which PEFT's lora_A does not take either: refused), lora_b [1, ..., 1, r / groups,
    out] a 1x1 convolution with the base's groups. PEFT's lora_A.weight is [r, in, *kernel] and
    lora_B.weight [out, r / groups, 1, ...]."""

    def __init__(
        self,
        base: nnx.Conv,
        r: int,
        scaling: float,
        dropout: float,
        torch_name: str,
        rngs: nnx.Rngs,
    ):
        groups = base.feature_group_count
        if any(d != 1 for d in _as_tuple(base.kernel_dilation, len(base.kernel_size))):
            raise NotImplementedError(
                f"LoRA on {torch_name}: a dilated convolution (dilation "
                f"{base.kernel_dilation}); PEFT's lora_A does not take the dilation"
            )
        if r % groups:
            raise ValueError(  # PEFT's own refusal
                f"LoRA on {torch_name} (groups={groups}): the rank r={r} must be divisible by "
                "the convolution's groups, as PEFT requires"
            )
        kernel = tuple(base.kernel_size)
        ones = (1,) * len(kernel)
        a_shape, b_shape = (*kernel, base.in_features, r), (*ones, r // groups, base.out_features)
        fan_in = base.in_features * math.prod(kernel)  # PEFT's kaiming_uniform_(a=sqrt(5))
        bound = 1 / math.sqrt(fan_in)
        in_axis, out_axis = (base.kernel.get_metadata("out_sharding", None) or (None, None))[-2:]
        spatial = (None,) * len(kernel)
        super().__init__(
            base.in_features,
            r,
            base.out_features,
            base_module=base,
            dtype=base.dtype,
            param_dtype=base.param_dtype,
            # nnx.LoRA asks for [in, r] and [r, out]: the convolutions' kernels are drawn instead
            a_initializer=lambda key, _, dtype: jax.random.uniform(
                key, a_shape, dtype, -bound, bound
            ),
            b_initializer=lambda key, _, dtype: jnp.zeros(b_shape, dtype),
            rngs=rngs,
            a_metadata={"out_sharding": (*spatial, in_axis, None), "eager_sharding": False},
            b_metadata={"out_sharding": (*spatial, None, out_axis), "eager_sharding": False},
        )
        self.scaling = scaling
        self.dropout = nnx.Dropout(dropout, rngs=rngs)
        self.torch_name = torch_name
        self.groups = groups

    def _convolve(self, x, kernel, strides, padding, groups):
        spatial = "DHW"[-(kernel.ndim - 2) :]  # torch's Conv1d, 2d, 3d: W, HW, DHW
        return jax.lax.conv_general_dilated(
            x,
            kernel,
            window_strides=strides,
            padding=padding,
            feature_group_count=groups,
            dimension_numbers=(f"N{spatial}C", f"{spatial}IO", f"N{spatial}C"),
            precision=self.base_module.precision,
        )

    def __call__(self, x: jax.Array) -> jax.Array:  # x [B, *spatial, in] -> [B, *spatial', out]
        base = self.base_module(x)
        dtype = base.dtype
        a, b = self.lora_a[...].astype(dtype), self.lora_b[...].astype(dtype)
        n = a.ndim - 2
        strides = _as_tuple(self.base_module.strides, n)
        hidden = self._convolve(
            self.dropout(x).astype(dtype), a, strides, self.base_module.padding, 1
        )  # [B, *spatial', r]
        update = self._convolve(hidden, b, (1,) * n, "VALID", self.groups)
        return base + (update * self.scaling).astype(dtype)

    def delta(self) -> jax.Array:
        """The update to the base kernel [*kernel, in, out] that merging adds."""
        if self.groups > 1:
            raise NotImplementedError(  # as PEFT: the 1x1 grouped lora_B has no dense form
                f"merging LoRA into {self.torch_name}, a convolution with groups={self.groups}, "
                "is not supported (PEFT does not merge it either)"
            )
        a = self.lora_a[...].astype(jnp.float32)  # [*kernel, in, r]
        b = self.lora_b[...].astype(jnp.float32).reshape(a.shape[-1], -1)  # [r, out]
        return (a @ b) * self.scaling

    def to_peft(self, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """lora_a, lora_b -> PEFT's lora_A.weight [r, in, *kernel], lora_B.weight [out, r/g,
        1, ...] (flax's channels-last kernels to torch's)."""
        order = (a.ndim - 1, a.ndim - 2, *range(a.ndim - 2))
        return a.transpose(order), b.transpose(order)

    def from_peft(self, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        order = (*range(2, a.ndim), 1, 0)
        return a.transpose(order), b.transpose(order)


def _as_tuple(value, n: int) -> tuple[int, ...]:
    return (value,) * n if isinstance(value, int) else tuple(value)


#: the adapter modules lora() puts in place, by the layer type they wrap
ADAPTERS = ((nnx.Conv, LoRAConv), (nnx.Linear, LoRALinear))


def _check_plain_layers(model) -> None:
    from flaxauto.stacks import ScannedLayers

    for _, module in nnx.iter_modules(model):
        if isinstance(module, ScannedLayers):
            raise NotImplementedError(
                "LoRA on scan_layers=True models is not implemented: load without scan_layers"
            )


def _torch_name(model, name: str) -> str:
    """A checkpoint name -> the name transformers' PyTorch model holds it under in memory."""
    rename = model.family.torch_names
    return name if rename is None else rename(name)


def _hub_name(model, name: str) -> str:
    """transformers' in-memory name -> the checkpoint name flaxauto's converters use."""
    renames = model.family.renames
    return renames(name) if callable(renames) else renames.get(name, name)


def _adaptable_names(model) -> dict[int, str]:
    """id(linear or convolution layer) -> its PyTorch module name as transformers holds it in
    memory (PEFT's), read off the converters' table."""
    names = {}
    for name, slot in parameter_slots(model).items():
        names[id(slot.variable)] = name.rsplit(".", 1)[0]
    kinds = tuple(kind for kind, _ in ADAPTERS)
    return {
        id(module): _torch_name(model, names[id(module.kernel)])
        for _, module in nnx.iter_modules(model)
        if isinstance(module, kinds) and id(module.kernel) in names
    }


def _matches(name: str, target_modules: Sequence[str] | str) -> bool:
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def _replace(model, path: tuple, module) -> None:
    parent = model
    for part in path[:-1]:
        parent = parent[part] if isinstance(part, int) else getattr(parent, part)
    last = path[-1]
    if isinstance(last, int):
        parent[last] = module
    else:
        setattr(parent, last, module)


def lora_layers(model) -> dict[str, LoRALinear | LoRAConv]:
    """The model's LoRA layers by PyTorch module name."""
    adapters = tuple(adapter for _, adapter in ADAPTERS)
    return {m.torch_name: m for _, m in nnx.iter_modules(model) if isinstance(m, adapters)}


def lora(
    model,
    *,
    r: int,
    alpha: float | None = None,
    target_modules: Sequence[str] | str,
    dropout: float = 0.0,
    use_rslora: bool = False,
    seed: int = 0,
):
    """Wrap the linear and convolution layers named by target_modules in LoRA adapters (in
    place); returns the model. Scaling is PEFT's alpha / r (alpha / sqrt(r) with use_rslora;
    alpha defaults to r). lora_A starts as PEFT's (uniform in +-1/sqrt(fan in)) and lora_B at
    zero, so the model's outputs do not change until it trains."""
    if r <= 0:
        raise ValueError(f"LoRA rank r must be positive, got {r}")
    if lora_layers(model):
        raise ValueError("the model already has LoRA adapters (merge_lora folds them in)")
    _check_plain_layers(model)
    alpha = r if alpha is None else alpha
    scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
    names = _adaptable_names(model)
    targets = [
        (path, module, names[id(module)])
        for path, module in nnx.iter_modules(model)
        if id(module) in names and _matches(names[id(module)], target_modules)
    ]
    if not targets:
        raise ValueError(
            f"target_modules {target_modules!r} match no linear or convolution layer; some "
            f"names: "
            f"{sorted(names.values())[:8]}"
        )
    rngs = nnx.Rngs(seed)
    # the new dropouts follow the model's mode (from_pretrained leaves it in eval mode)
    deterministic = next(
        (m.deterministic for _, m in nnx.iter_modules(model) if isinstance(m, nnx.Dropout)), True
    )
    mesh, rules = getattr(model.static, "placement", (None, None))
    for path, module, name in targets:
        adapter = next(adapter for kind, adapter in ADAPTERS if isinstance(module, kind))
        layer = adapter(module, r, scaling, dropout, name, rngs)
        layer.dropout.deterministic = deterministic
        if mesh is not None:  # the adapters split as their base kernel does
            shard_model(layer, mesh, rules)
        _replace(model, path, layer)
    model.static.lora_config = dict(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        use_rslora=use_rslora,
        target_modules=target_modules if isinstance(target_modules, str) else list(target_modules),
    )
    return model


def merge_lora(model):
    """Fold every adapter into its base kernel (W + scaling * A @ B) and put the base layers
    back in place; returns the model, ready for save_pretrained."""
    adapters = list(lora_layers(model).values())
    for adapter in adapters:
        adapter.delta()  # refuses before anything changes (a grouped convolution's)
    for path, module in list(nnx.iter_modules(model)):
        if isinstance(module, tuple(adapter for _, adapter in ADAPTERS)):
            base = module.base_module
            kernel = base.kernel[...]
            base.kernel.set_value(
                (kernel.astype(jnp.float32) + module.delta()).astype(kernel.dtype)
            )
            _replace(model, path, base)
    if hasattr(model.static, "lora_config"):
        del model.static.lora_config
    return model


# -- PEFT's files -------------------------------------------------------------------------------


def _peft_config(model, modules_to_save) -> dict:
    config = dict(model.static.lora_config)
    return {
        "peft_type": "LORA",
        "task_type": PEFT_TASK_TYPES.get(model.task),
        "base_model_name_or_path": getattr(model.config, "_name_or_path", None) or None,
        "r": config["r"],
        "lora_alpha": config["lora_alpha"],
        "lora_dropout": config["lora_dropout"],
        "target_modules": config["target_modules"],
        "use_rslora": config["use_rslora"],
        "bias": "none",
        # GPT-2's Conv1D stores its weight [in, out]: PEFT's flag for it
        "fan_in_fan_out": model.config.model_type == "gpt2",
        "modules_to_save": list(modules_to_save) if modules_to_save else None,
        "init_lora_weights": True,
        "inference_mode": True,
        "use_dora": False,
        "rank_pattern": {},
        "alpha_pattern": {},
    }


def save_lora(model, save_directory, *, modules_to_save: Sequence[str] | None = None) -> Path:
    """Write PEFT's adapter_model.safetensors and adapter_config.json: lora_A.weight [r, in]
    and lora_B.weight [out, r] under `base_model.model.<module>.`, and the whole tensors of
    modules_to_save (a head trained in full) under their PyTorch names. modules_to_save
    defaults to what PEFT's task type saves: the classifier of sequence / token
    classification ("classifier" or "score"), "qa_outputs" of question answering."""
    from safetensors.numpy import save_file

    layers_ = lora_layers(model)
    if not layers_:
        raise ValueError("the model has no LoRA adapters (see flaxauto.lora)")
    if modules_to_save is None:  # as PEFT: its task type saves the head
        names = parameter_slots(model)
        heads = PEFT_HEAD_MODULES.get(model.task, ())
        modules_to_save = [m for m in heads if any(_module_matches(n, m) for n in names)]
    tensors = {}
    for name, layer in layers_.items():
        a, b = (np.asarray(jax.device_get(v[...])) for v in (layer.lora_a, layer.lora_b))
        a, b = layer.to_peft(a, b)
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = np.ascontiguousarray(a)
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = np.ascontiguousarray(b)
    for name, slot in _saved_module_slots(model, modules_to_save or ()).items():
        value = np.asarray(jax.device_get(slot.variable.get_value()))
        tensors[PEFT_PREFIX + _torch_name(model, name)] = slot.to_torch(value)
    directory = Path(save_directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, directory / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    config = _peft_config(model, modules_to_save)
    (directory / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return directory


def _module_matches(name: str, module: str) -> bool:
    """PEFT's modules_to_save test: a module (or a module above it) whose name ends with the
    string: "classifier" takes DistilBERT's pre_classifier too, as it does in PEFT."""
    parts = name.split(".")[:-1]  # the tensor's module path
    return any(".".join(parts[:i]).endswith(module) for i in range(1, len(parts) + 1))


def _saved_module_slots(model, modules: Sequence[str]) -> dict:
    slots = {}
    for module in modules:
        found = {
            name: slot
            for name, slot in parameter_slots(model).items()
            if _module_matches(name, module)
        }
        if not found:
            raise ValueError(f"modules_to_save: no parameters under {module!r}")
        slots |= found
    return slots


#: adapter_config.json settings load_lora implements, with the values it implements
_UNSUPPORTED = {
    "use_dora": (False, None),
    "rank_pattern": ({}, None),
    "alpha_pattern": ({}, None),
    "bias": ("none", None),
    "layers_to_transform": (None,),
    "layer_replication": (None,),
    "use_qalora": (False, None),
    "lora_bias": (False, None),
}


def _read_config(directory: Path) -> dict:
    config = json.loads((directory / ADAPTER_CONFIG).read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise NotImplementedError(f"peft_type {config['peft_type']!r}: only LORA is implemented")
    for key, allowed in _UNSUPPORTED.items():
        if key in config and config[key] not in allowed:
            raise NotImplementedError(
                f"adapter_config.json {key}={config[key]!r} is not implemented"
            )
    return config


def load_lora(model, directory, *, seed: int = 0):
    """Read a PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors, as peft or
    save_lora writes them) onto the model: wraps its target modules (if the model has no
    adapters yet) and fills the adapters and any modules_to_save tensors. Returns the model."""
    from safetensors.numpy import load_file

    directory = Path(directory)
    config = _read_config(directory)
    if not lora_layers(model):
        lora(
            model,
            r=config["r"],
            alpha=config.get("lora_alpha", config["r"]),
            target_modules=config["target_modules"],
            dropout=config.get("lora_dropout", 0.0),
            use_rslora=config.get("use_rslora", False),
            seed=seed,
        )
    layers_ = lora_layers(model)
    slots = parameter_slots(model)
    unexpected, filled, pairs = [], set(), {}
    for key, tensor in load_file(directory / ADAPTER_WEIGHTS).items():
        name = key.removeprefix(PEFT_PREFIX)
        name = re.sub(r"\.lora_([AB])\.[^.]+\.weight$", r".lora_\1.weight", name)  # adapter name
        match = re.fullmatch(r"(.+)\.lora_([AB])\.weight", name)
        saved = _hub_name(model, name.replace(".modules_to_save.", "."))
        if match and match[1] in layers_:
            pairs.setdefault(match[1], {})[match[2]] = (tensor, key)
        elif saved in slots:
            _fill(slots[saved].variable, slots[saved].to_flax(tensor), key)
        else:
            unexpected.append(key)
    for name, pair in pairs.items():
        layer = layers_[name]
        if set(pair) != {"A", "B"}:
            continue  # reported as missing below
        a, b = layer.from_peft(pair["A"][0], pair["B"][0])
        _fill(layer.lora_a, a, pair["A"][1])
        _fill(layer.lora_b, b, pair["B"][1])
        filled |= {(name, "A"), (name, "B")}
    if unexpected:
        raise ValueError(f"{directory / ADAPTER_WEIGHTS}: tensors this model has no place for: "
                         f"{unexpected[:8]}")  # fmt: skip
    missing = [n for n in layers_ if {(n, "A"), (n, "B")} - filled]
    if missing:
        raise ValueError(f"{directory / ADAPTER_WEIGHTS}: no adapter for {missing[:8]}")
    return model


def _fill(variable: nnx.Variable, array: np.ndarray, key: str) -> None:
    old = variable.get_value()
    if tuple(array.shape) != tuple(old.shape):
        raise ValueError(f"{key}: shape {tuple(array.shape)}, the model expects {old.shape}")
    value = jnp.asarray(array, dtype=old.dtype)
    sharding = getattr(old, "sharding", None)
    variable.set_value(jax.device_put(value, sharding) if sharding is not None else value)
