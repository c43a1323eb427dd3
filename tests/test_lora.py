"""LoRA through nnx.LoRA against PEFT on transformers' PyTorch models: adapters flaxauto saves
load into peft with equal outputs, adapters peft saves load into flaxauto with equal outputs,
merging folds them into weights transformers loads, and training touches the adapters only."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import peft
import pytest
import torch
from flax import nnx

import flaxauto
from flaxauto.converters.layout import parameter_slots
from flaxauto.lora import LoRAConv, LoRALinear, lora_layers
from flaxauto.registry import TASK_AUTO_CLASSES
from references import (
    LABEL_FACTORIES,
    TINY_CONFIGS,
    output_diff,
    run_torch,
    task_inputs,
    task_labels,
    task_pairs,
    to_numpy,
    torch_model,
)

TOLERANCE = 1e-4
FAMILY_TASKS: dict[str, str] = {}
for _model_type, _task in task_pairs():
    if _task in LABEL_FACTORIES and _model_type in TINY_CONFIGS:
        FAMILY_TASKS.setdefault(_model_type, _task)
FAMILIES = sorted(FAMILY_TASKS)
#: the attention projections a PEFT user lists (query- and value-like), by family spelling;
#: ViT, DeiT and BEiT's are transformers 5's in-memory q_proj / v_proj
ATTENTION = ("query", "value", "q_lin", "v_lin", "c_attn", "q_proj", "v_proj")


def _attention_targets(model) -> list[str]:
    """The last names of the backbone's attention projections (query/value-like), as a PEFT
    user would list them; ResNet's and RegNet's convolutions ("convolution") where there is no
    attention; else every linear layer (ConvNeXt's pointwise pwconv1 / pwconv2)."""
    from flaxauto.lora import _adaptable_names

    names = sorted({n.rsplit(".", 1)[-1] for n in _adaptable_names(model).values()})
    picked = [n for n in names if n in ATTENTION] or [n for n in names if n == "convolution"]
    # not a bare index ("1" of a Sequential also ends a block's name, which PEFT then refuses)
    # nor the depthwise dwconv (groups = channels, which the rank would have to divide)
    return picked or [n for n in names if n != "dwconv" and not n.isdigit()]


def _load(model_type, tmp_path):
    task = FAMILY_TASKS[model_type]
    reference = torch_model(model_type, task)
    reference.save_pretrained(tmp_path / "base")
    model = getattr(flaxauto, TASK_AUTO_CLASSES[task]).from_pretrained(tmp_path / "base")
    inputs = task_inputs(model_type, task, config=reference.config)
    return task, reference, model, inputs


def _randomize_adapters(model, seed=0):
    """A trained adapter's B is not zero: give every adapter matrix random values."""
    key = jax.random.key(seed)
    for layer in lora_layers(model).values():
        for variable in (layer.lora_a, layer.lora_b):
            key, sub = jax.random.split(key)
            variable.set_value(0.3 * jax.random.normal(sub, variable.get_value().shape))


def _field(output):
    return next(f for f in ("logits", "start_logits") if getattr(output, f, None) is not None)


def _assert_close(model_type, inputs, ours, theirs):
    field = _field(theirs)
    diff = output_diff(model_type, inputs, field, getattr(ours, field), getattr(theirs, field))
    # relative to the field's size: mT5's tied logits, not rescaled, reach ~10
    scale = max(1.0, float(np.max(np.abs(to_numpy(getattr(theirs, field))))))
    assert diff <= TOLERANCE * scale, f"{field}: {diff:.2e}"


@pytest.mark.parametrize("model_type", FAMILIES)
def test_saved_adapters_load_into_peft_with_equal_outputs(model_type, tmp_path):
    task, reference, model, inputs = _load(model_type, tmp_path)
    before = model(**inputs)
    targets = _attention_targets(model)
    flaxauto.lora(model, r=4, alpha=8, target_modules=targets, dropout=0.1)
    adapters = lora_layers(model)
    kinds = {type(m): isinstance(m.base_module, nnx.Conv) for m in adapters.values()}
    assert adapters and kinds in (
        {LoRALinear: False},
        {LoRAConv: True},
        {LoRALinear: False, LoRAConv: True},
    )
    _assert_close(model_type, inputs, model(**inputs), before)  # B starts at zero
    _randomize_adapters(model)
    adapted = model(**inputs)
    assert (
        output_diff(
            model_type,
            inputs,
            _field(before),
            getattr(adapted, _field(before)),
            getattr(before, _field(before)),
        )
        > 1e-3
    )

    flaxauto.save_lora(model, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8
    peft_model = peft.PeftModel.from_pretrained(reference, tmp_path / "adapter").eval()
    _assert_close(model_type, inputs, adapted, run_torch(peft_model, inputs))


@pytest.mark.parametrize("model_type", FAMILIES)
def test_adapters_peft_saved_load_and_merge(model_type, tmp_path):
    task, reference, model, inputs = _load(model_type, tmp_path)
    targets = _attention_targets(model)
    torch.manual_seed(0)
    # rank 4: a grouped convolution's (RegNet's, groups 2 and 4) must divide it, in PEFT too
    lora_config = peft.LoraConfig(
        r=4, lora_alpha=6, target_modules=targets, init_lora_weights=False, use_rslora=True
    )
    peft_model = peft.get_peft_model(reference, lora_config).eval()
    peft_model.save_pretrained(tmp_path / "peft")
    expected = run_torch(peft_model, inputs)

    flaxauto.load_lora(model, tmp_path / "peft")
    _assert_close(model_type, inputs, model(**inputs), expected)

    with pytest.raises(ValueError, match="merge_lora"):
        model.save_pretrained(tmp_path / "refused")
    grouped = [n for n, m in lora_layers(model).items() if getattr(m, "groups", 1) > 1]
    if grouped:  # PEFT merges no grouped convolution's adapter either
        with pytest.raises(NotImplementedError, match="groups"):
            peft_model.merge_and_unload()
        with pytest.raises(NotImplementedError, match="groups"):
            flaxauto.merge_lora(model)
        assert set(lora_layers(model)) == set(peft_model.base_model.targeted_module_names)
        return
    flaxauto.merge_lora(model)
    assert not lora_layers(model)
    _assert_close(model_type, inputs, model(**inputs), expected)
    model.save_pretrained(tmp_path / "merged")
    merged = type(peft_model.get_base_model()).from_pretrained(tmp_path / "merged").eval()
    _assert_close(model_type, inputs, model(**inputs), run_torch(merged, inputs))


def test_training_updates_only_the_adapters(tmp_path):
    task, reference, model, inputs = _load("llama", tmp_path)
    flaxauto.lora(model, r=4, alpha=4, target_modules=["q_proj", "v_proj"])
    model.train()
    batch = {**inputs, **task_labels(reference, task, inputs)}
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.LoRAParam)
    base_before = jax.tree.map(
        np.asarray, nnx.state(model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam)))
    )
    lora_before = jax.tree.map(np.asarray, nnx.state(model, nnx.LoRAParam))

    @nnx.jit
    def step(model, optimizer, batch):
        loss, grads = nnx.value_and_grad(
            lambda m: m(**batch).loss, argnums=nnx.DiffState(0, nnx.LoRAParam)
        )(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(step(model, optimizer, batch)) for _ in range(5)]
    assert losses[-1] < losses[0]
    base_after = nnx.state(model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam)))
    jax.tree.map(np.testing.assert_array_equal, base_before, jax.tree.map(np.asarray, base_after))
    changed = jax.tree.map(
        lambda a, b: not np.array_equal(a, np.asarray(b)),
        lora_before,
        nnx.state(model, nnx.LoRAParam),
    )
    assert all(jax.tree.leaves(changed))


def test_unsupported_settings_are_refused(tmp_path):
    task, reference, model, inputs = _load("bert", tmp_path)
    flaxauto.lora(model, r=2, target_modules=["query"])
    flaxauto.save_lora(model, tmp_path / "adapter")
    config_path = tmp_path / "adapter" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "use_dora": True}))
    auto_class = getattr(flaxauto, TASK_AUTO_CLASSES[task])
    fresh = auto_class.from_pretrained(tmp_path / "base")
    with pytest.raises(NotImplementedError, match="use_dora"):
        flaxauto.load_lora(fresh, tmp_path / "adapter")
    with pytest.raises(ValueError, match="match no linear"):
        flaxauto.lora(fresh, r=2, target_modules=["no_such_layer"])
    scanned = auto_class.from_pretrained(tmp_path / "base", scan_layers=True)
    with pytest.raises(NotImplementedError, match="scan_layers"):
        flaxauto.lora(scanned, r=2, target_modules=["query"])


def test_modules_to_save_round_trip_through_peft(tmp_path):
    """A classifier trained in full beside the adapters (PEFT's modules_to_save) travels in the
    adapter file both ways."""
    task, reference, model, inputs = _load("bert", tmp_path)
    flaxauto.lora(model, r=2, alpha=4, target_modules=["query", "value"])
    _randomize_adapters(model, seed=1)
    head = parameter_slots(model)["classifier.weight"].variable
    head.set_value(head.get_value() + 0.5)
    flaxauto.save_lora(model, tmp_path / "adapter", modules_to_save=["classifier"])
    peft_model = peft.PeftModel.from_pretrained(reference, tmp_path / "adapter").eval()
    _assert_close("bert", inputs, model(**inputs), run_torch(peft_model, inputs))
    fresh = getattr(flaxauto, TASK_AUTO_CLASSES[task]).from_pretrained(tmp_path / "base")
    flaxauto.load_lora(fresh, tmp_path / "adapter")
    _assert_close("bert", inputs, fresh(**inputs), model(**inputs))
    assert jnp.array_equal(parameter_slots(fresh)["classifier.weight"].variable[...], head[...])


def test_convolutions_peft_cannot_adapt_are_refused():
    """PEFT's lora_A takes no dilation, and a grouped convolution's rank must divide by its
    groups (PEFT raises the same ValueError): both refused when the adapter is made."""
    from flaxauto.lora import LoRAConv

    rngs = nnx.Rngs(0)
    dilated = nnx.Conv(4, 4, (3, 3), kernel_dilation=(2, 2), rngs=rngs)
    with pytest.raises(NotImplementedError, match="dilat"):
        LoRAConv(dilated, 2, 1.0, 0.0, "conv", rngs)
    grouped = nnx.Conv(4, 8, (3, 3), feature_group_count=4, rngs=rngs)
    with pytest.raises(ValueError, match="divisible"):
        LoRAConv(grouped, 2, 1.0, 0.0, "conv", rngs)
    adapter = LoRAConv(grouped, 4, 1.0, 0.0, "conv", rngs)
    assert adapter.lora_a.shape == (3, 3, 4, 4) and adapter.lora_b.shape == (1, 1, 1, 8)
