"""Llama, Mistral and Qwen2: one implementation of transformers' LlamaModel with small adapters.

The three transformers models compute the same thing (RMSNorm, rotary embeddings, grouped-query
attention, SwiGLU) and differ only in which projections carry a bias and which layers attend
through a sliding window; each model_type's adapter reads that from its config into a `Variant`
and refuses what it does not implement. Attribute paths are transformers' (`embed_tokens`,
`layers.0.self_attn.q_proj`, `norm`).
"""

from __future__ import annotations

from dataclasses import dataclass

from flax import nnx

from flaxauto import layers, rope
from flaxauto.decoder import DecoderBackbone, DecoderStep, KVCache
from flaxauto.heads import (
    CausalLMHead,
    QuestionAnsweringHead,
    SequenceClassificationHead,
    TokenClassificationHead,
)
from flaxauto.outputs import BaseModelOutputWithPast
from flaxauto.registry import HeadSpec, register

Precision = layers.Precision


@dataclass(frozen=True)
class Variant:
    """Where a model_type departs from Llama."""

    qkv_bias: bool  # q_proj, k_proj, v_proj
    o_bias: bool  # o_proj
    mlp_bias: bool  # gate_proj, up_proj, down_proj
    windows: tuple[int | None, ...]  # per layer: sliding window size, None for full attention


# --- config checks: one adapter per model_type ----------------------------------------------------


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def check_common(config) -> None:
    """What every Llama-like model_type must satisfy here."""
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    if heads % kv_heads:
        raise ValueError(
            f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}"
        )
    layers.activation(config.hidden_act)
    rope.rope_from_config(config, head_dim(config))
    if getattr(config, "token_classification_bias", True) is not True:
        raise NotImplementedError("token_classification_bias=False is not implemented")


def llama_variant(config) -> Variant:
    check_common(config)
    bias = bool(config.attention_bias)
    return Variant(bias, bias, bool(config.mlp_bias), (None,) * config.num_hidden_layers)


def mistral_variant(config) -> Variant:
    """Mistral: no biases; every layer attends through config.sliding_window (None: full)."""
    check_common(config)
    return Variant(False, False, False, (config.sliding_window,) * config.num_hidden_layers)


def qwen2_variant(config) -> Variant:
    """Qwen2: q/k/v biases; config.layer_types (derived by the config from use_sliding_window and
    max_window_layers) says which layers use config.sliding_window."""
    check_common(config)
    kinds = tuple(config.layer_types)
    unknown = set(kinds) - {"full_attention", "sliding_attention"}
    if unknown:
        raise NotImplementedError(f"layer_types {sorted(unknown)} are not implemented for qwen2")
    if len(kinds) != config.num_hidden_layers:
        raise ValueError(f"layer_types has {len(kinds)} entries for {config.num_hidden_layers}")
    windows = tuple(config.sliding_window if k == "sliding_attention" else None for k in kinds)
    return Variant(True, False, False, windows)


# --- modules -------------------------------------------------------------------------------------


class LlamaAttention(nnx.Module):
    def __init__(self, config, variant: Variant, precision: Precision, rngs: nnx.Rngs):
        hidden, depth = config.hidden_size, head_dim(config)
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.scale = depth**-0.5
        q_out, kv_out = self.num_heads * depth, self.num_kv_heads * depth
        bias = {"use_bias": variant.qkv_bias}
        self.q_proj = layers.linear(hidden, q_out, ("embed", "heads"), precision, rngs, **bias)
        self.k_proj = layers.linear(hidden, kv_out, ("embed", "kv"), precision, rngs, **bias)
        self.v_proj = layers.linear(hidden, kv_out, ("embed", "kv"), precision, rngs, **bias)
        self.o_proj = layers.linear(
            q_out, hidden, ("heads", "embed"), precision, rngs, use_bias=variant.o_bias
        )
        self.dropout = layers.dropout(config.attention_dropout, rngs)
        self.implementation = precision.attention

    def __call__(self, hidden_states, step: DecoderStep, layer_cache, bias, cos, sin):
        q = layers.split_heads(self.q_proj(hidden_states), self.num_heads)  # [B, T, H, D]
        k = layers.split_heads(self.k_proj(hidden_states), self.num_kv_heads)  # [B, T, K, D]
        v = layers.split_heads(self.v_proj(hidden_states), self.num_kv_heads)
        q, k = rope.apply_rotary(q, cos, sin), rope.apply_rotary(k, cos, sin)
        k, v, layer_cache = step.keys_values(layer_cache, k, v)  # [B, S, K, D]
        context, probs = layers.dot_product_attention(
            q, k, v, bias, self.dropout, scale=self.scale,
            implementation=self.implementation, output_attentions=step.output_attentions,
        )  # fmt: skip
        return self.o_proj(layers.merge_heads(context)), probs, layer_cache


class LlamaMLP(nnx.Module):
    """SwiGLU: down(act(gate(x)) * up(x))."""

    def __init__(self, config, variant: Variant, precision: Precision, rngs: nnx.Rngs):
        hidden, inner = config.hidden_size, config.intermediate_size
        bias = {"use_bias": variant.mlp_bias}
        self.gate_proj = layers.linear(hidden, inner, ("embed", "mlp"), precision, rngs, **bias)
        self.up_proj = layers.linear(hidden, inner, ("embed", "mlp"), precision, rngs, **bias)
        self.down_proj = layers.linear(inner, hidden, ("mlp", "embed"), precision, rngs, **bias)
        self.act_fn = layers.activation(config.hidden_act)

    def __call__(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nnx.Module):
    """Pre-norm: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config, variant: Variant, precision: Precision, rngs: nnx.Rngs):
        hidden, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = LlamaAttention(config, variant, precision, rngs)
        self.mlp = LlamaMLP(config, variant, precision, rngs)
        self.input_layernorm = layers.rms_norm(hidden, eps, precision, rngs)
        self.post_attention_layernorm = layers.rms_norm(hidden, eps, precision, rngs)

    def __call__(self, hidden_states, step: DecoderStep, layer_cache, bias, cos, sin):
        normed = self.input_layernorm(hidden_states)
        attended, probs, layer_cache = self.self_attn(normed, step, layer_cache, bias, cos, sin)
        hidden_states = hidden_states + attended
        hidden_states = hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))
        return hidden_states, probs, layer_cache


class LlamaModel(DecoderBackbone):
    """The backbone: token embeddings, decoder layers, final RMSNorm; rotary embeddings are
    computed from position_ids (no parameters)."""

    variant = staticmethod(llama_variant)

    def __init__(
        self, config, precision: Precision, rngs: nnx.Rngs, *, scan_layers=False, remat=False
    ):
        variant = self.variant(config)
        self.windows = variant.windows
        self.rope = rope.rope_from_config(config, head_dim(config))
        self.embed_tokens = layers.embedding(
            config.vocab_size, config.hidden_size, ("vocab", "embed"), precision, rngs,
            padding_idx=config.pad_token_id,
        )  # fmt: skip
        self.layers = self.layer_stack(
            lambda _, rngs: LlamaDecoderLayer(config, variant, precision, rngs),
            config.num_hidden_layers, rngs, scan_layers, remat,
        )  # fmt: skip
        self.norm = layers.rms_norm(config.hidden_size, config.rms_norm_eps, precision, rngs)
        self.cache_shape = (config.num_hidden_layers, config.num_key_value_heads, head_dim(config))
        self.compute_dtype = precision.dtype

    def get_input_embeddings(self) -> nnx.Embed:
        return self.embed_tokens

    @property
    def stack(self):
        return self.layers

    def __call__(
        self,
        *,
        input_ids=None,  # [B, T]
        attention_mask=None,  # [B, T], 1 = token, 0 = padding (with a cache: the new tokens)
        position_ids=None,  # [B or 1, T]
        inputs_embeds=None,  # [B, T, E]
        cache: KVCache | None = None,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
    ) -> BaseModelOutputWithPast:
        embeds, step, position_ids = self.begin(
            self.embed_tokens, input_ids, inputs_embeds, attention_mask, position_ids, cache,
            self.windows,
        )  # fmt: skip
        cos, sin = rope.cos_sin(self.rope, position_ids, embeds.dtype)  # [B or 1, T, D]
        return self.finish(
            embeds,
            step,
            self.norm,
            cos=cos,
            sin=sin,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
        )


class MistralModel(LlamaModel):
    variant = staticmethod(mistral_variant)


class Qwen2Model(LlamaModel):
    variant = staticmethod(qwen2_variant)


# --- registration --------------------------------------------------------------------------------


def heads(question_answering_prefix: str | None = None) -> dict[str, HeadSpec]:
    """transformers' heads for the Llama family: the generic decoder heads of modeling_layers."""
    return {
        "base": HeadSpec(None),
        "causal-lm": HeadSpec(CausalLMHead),
        "sequence-classification": HeadSpec(
            SequenceClassificationHead,
            names={"classifier.out": "score"},
            options={"pooling": "last_token", "use_bias": False, "dropout_rate": 0.0},
        ),
        "token-classification": HeadSpec(TokenClassificationHead, names={"classifier": "score"}),
        "question-answering": HeadSpec(
            QuestionAnsweringHead,
            options={"num_outputs": 2},
            base_model_prefix=question_answering_prefix,
        ),
    }


#: What every Llama-like model_type reads from the config (flaxauto.config_checks refuses the
#: rest); each adds its own below.
COMMON_CONFIG_ATTRIBUTES = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "rms_norm_eps",
    "rope_parameters", "attention_dropout", "pad_token_id", "tie_word_embeddings",
    # the generic token classification head's dropout and bias, when present
    "classifier_dropout", "hidden_dropout", "token_classification_bias",
)  # fmt: skip
# pretraining_tp split the projections in old transformers; the product is the same
LLAMA_CONFIG_ATTRIBUTES = (
    *COMMON_CONFIG_ATTRIBUTES,
    "attention_bias",
    "mlp_bias",
    "pretraining_tp",
)
MISTRAL_CONFIG_ATTRIBUTES = (*COMMON_CONFIG_ATTRIBUTES, "sliding_window")
QWEN2_CONFIG_ATTRIBUTES = (
    *COMMON_CONFIG_ATTRIBUTES, "use_sliding_window", "max_window_layers", "layer_types",
    "sliding_window",
)  # fmt: skip

# Llama's and Qwen2's ForQuestionAnswering keep the backbone under "transformer" (as older
# checkpoints did); Mistral's under "model". Checkpoints written by transformers before 4.31
# carry each layer's rotary inverse frequencies (recomputed from the config, never loaded).
for model_type, backbone, question_answering_prefix, config_attributes in (
    ("llama", LlamaModel, "transformer", LLAMA_CONFIG_ATTRIBUTES),
    ("mistral", MistralModel, None, MISTRAL_CONFIG_ATTRIBUTES),
    ("qwen2", Qwen2Model, "transformer", QWEN2_CONFIG_ATTRIBUTES),
):
    register(
        model_types=(model_type,),
        backbone=backbone,
        base_model_prefix="model",
        heads=heads(question_answering_prefix),
        ignored=("rotary_emb.inv_freq",),
        config_attributes=config_attributes,
    )
