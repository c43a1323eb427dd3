"""Config whitelists: every family refuses a setting it does not implement, naming it, and loads
the settings that cannot change its numbers (with transformers' numbers)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import transformers

import flaxauto
from flaxauto import config_checks, registry
from references import (
    DECODERS,
    TINY_CONFIGS,
    max_diff,
    run_torch,
    task_inputs,
    tiny_config,
    torch_model,
)

MODEL_TYPES = sorted(TINY_CONFIGS)

#: Per family, a setting transformers knows (for this family or another) that the family does
#: not implement; each would be silently ignored without the whitelist.
UNIMPLEMENTED = {
    "bert": {"is_encoder_decoder": True},
    "roberta": {"pruned_heads": {0: [1]}},
    "xlm-roberta": {"sinusoidal_pos_embds": True},
    "distilbert": {"position_embedding_type": "relative_key"},
    # flaxauto's shared classifier dropout would read it; GPT-2's token classifier does not
    "gpt2": {"hidden_dropout_prob": 0.3},
    "llama": {"sliding_window": 4},
    "mistral": {"layer_types": ["full_attention", "sliding_attention"]},
    "qwen2": {"use_mrope": True},
    "vit": {"use_mask_token": True},  # BEiT's masked-image-modeling token
    "deit": {"pruned_heads": {0: [1]}},
    "beit": {"use_mask_token": True},
    "videomae": {"use_absolute_position_embeddings": True},
    # stochastic depth, which ConvNeXt implements and ResNet / RegNet do not
    "resnet": {"drop_path_rate": 0.1},
    "regnet": {"drop_path_rate": 0.1},
    "convnext": {"hidden_dropout_prob": 0.3},
    "tapas": {"position_embedding_type": "relative_key"},
    # attention adapters (MMS checkpoints) and HuBERT's wav2vec2-only option
    "wav2vec2": {"adapter_attn_dim": 8},
    "hubert": {"add_adapter": True},
    # a key transformers' BERT family reads, absent from Whisper's config
    "whisper": {"pruned_heads": {0: [1]}},
    # BartForCausalLM's decoder alone
    "bart": {"is_decoder": True},
    "mbart": {"is_decoder": True},
    "pegasus": {"is_decoder": True},
    "marian": {"is_decoder": True},
    # T5's stacks as a decoder-only model
    "t5": {"is_decoder": True},
    "mt5": {"is_decoder": True},
    "umt5": {"is_decoder": True},
    # Deformable DETR's two-stage proposals, absent from DETR's config
    "detr": {"two_stage": True},
    # ViT's masked-image-modeling token: YOLOS has none
    "yolos": {"use_mask_token": True},
}

#: Settings hub configs carry that change no number.
HARMLESS = {
    "gradient_checkpointing": True,
    "use_cache": False,
    "output_past": True,
    "chunk_size_feed_forward": 3,  # divides the inputs' length, as transformers needs
    "pruned_heads": {},
    "initializer_range": 0.5,
    "tokenizer_class": "PreTrainedTokenizerFast",
    "finetuning_task": "demo",
}


def test_the_table_covers_every_family():
    assert set(UNIMPLEMENTED) == set(MODEL_TYPES) == set(flaxauto.supported())


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_an_unknown_setting_is_refused_naming_it(model_type):
    with pytest.raises(NotImplementedError, match="frobnicate=3"):
        flaxauto.AutoModel.from_config(tiny_config(model_type, frobnicate=3))


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_a_setting_the_family_does_not_implement_is_refused_naming_it(model_type):
    ((name, value),) = UNIMPLEMENTED[model_type].items()
    config = tiny_config(model_type, **{name: value})
    tasks = registry.supported()[model_type]
    task = "sequence-classification" if "sequence-classification" in tasks else tasks[-1]
    auto_class = getattr(flaxauto, registry.TASK_AUTO_CLASSES[task])
    with pytest.raises(NotImplementedError, match=f"{name}="):
        auto_class.from_config(config)
    # the other architecture: an encoder-decoder switch on an encoder or decoder, or off
    other = not transformers.AutoConfig.for_model(model_type).is_encoder_decoder
    with pytest.raises(NotImplementedError, match=f"is_encoder_decoder={other}"):
        flaxauto.AutoModel.from_config(tiny_config(model_type, is_encoder_decoder=other))


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_harmless_settings_load_with_transformers_numbers(model_type, tmp_path):
    torch_model(model_type, "base").save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    # as old transformers versions wrote them (this one drops some keys when saving)
    (tmp_path / "config.json").write_text(json.dumps({**config, **HARMLESS}))
    reference = transformers.AutoModel.from_pretrained(tmp_path, attn_implementation="eager")
    assert reference.config.chunk_size_feed_forward == 3
    model = flaxauto.AutoModel.from_pretrained(tmp_path)
    batch = task_inputs(model_type, "base")
    ours, theirs = model(**batch).last_hidden_state, run_torch(reference, batch).last_hidden_state
    if model_type in DECODERS:  # left padding: compare real tokens
        keep = batch["attention_mask"][..., None] == 1
        ours, theirs = np.where(keep, ours, 0), np.where(keep, theirs.numpy(), 0)
    assert max_diff(ours, theirs) <= 1e-4


def test_the_checkpoints_config_and_overrides_are_both_checked(tmp_path):
    torch_model("bert", "base").save_pretrained(tmp_path)
    with pytest.raises(NotImplementedError, match="is_encoder_decoder=True"):
        flaxauto.AutoModel.from_pretrained(tmp_path, is_encoder_decoder=True)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "frobnicate": [1]}))
    with pytest.raises(NotImplementedError, match=r"frobnicate=\[1\]"):
        flaxauto.AutoModel.from_pretrained(tmp_path)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_every_family_declares_a_whitelist_its_defaults_pass(model_type):
    family, _ = registry.lookup(model_type, "base")
    assert family.config_attributes is not None
    config = transformers.AutoConfig.for_model(model_type)
    config_checks.check_config_attributes(config, family.config_attributes, model_type)


def test_whitelists_may_name_attributes_by_their_aliases():
    config = transformers.GPT2Config(n_embd=64)  # GPT-2 calls hidden_size n_embd
    config_checks.check_config_attributes(config, ["hidden_size"], "gpt2")
    with pytest.raises(NotImplementedError, match="n_embd=64"):
        config_checks.check_config_attributes(config, [], "gpt2")
    config_checks.check_config_attributes(config, None, "gpt2")  # no whitelist: unchecked


@pytest.mark.parametrize("spelling", ["qv_bias", "qkv_bias"])
@pytest.mark.parametrize("value", [True, False])
def test_videomae_reads_both_spellings_of_its_query_value_bias(spelling, value):
    """transformers 5.24 renamed VideoMAE's `qkv_bias` to `qv_bias`; a config written by an
    earlier 5.x (or read by one) carries the old name, and must not fall back to the default."""
    from types import SimpleNamespace

    from flaxauto.models.videomae import query_value_bias

    assert query_value_bias(SimpleNamespace(**{spelling: value})) is value
