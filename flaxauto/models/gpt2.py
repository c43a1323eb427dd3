"""GPT-2 (transformers' GPT2Model), with the heads transformers registers for "gpt2".

Attribute paths are transformers' (`wte`, `h.0.attn.c_attn`, `ln_f`). GPT-2's linears are
"Conv1D": PyTorch stores their weight [in, out], which is already the flax kernel layout, so they
are `layers.Conv1D` modules and converters.layout keeps them untransposed. The LM head is tied to
`wte` unless config.tie_word_embeddings is False.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from flaxauto import layers
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


def check_config(config) -> None:
    """Refuse what this implementation does not compute, naming the attribute."""
    layers.check_heads_divide(config)
    if getattr(config, "add_cross_attention", False):
        raise NotImplementedError("add_cross_attention=True is not implemented for gpt2")
    layers.activation(config.activation_function, "activation_function")
    # scale_attn_weights and scale_attn_by_inverse_layer_idx set the score scale below;
    # reorder_and_upcast_attn asks for float32 scores, which every flaxauto attention computes.


def attention_scale(config, layer_idx: int) -> float:
    scale = 1.0
    if config.scale_attn_weights:
        scale = (config.hidden_size // config.num_attention_heads) ** -0.5
    if config.scale_attn_by_inverse_layer_idx:
        scale /= float(layer_idx + 1)
    return scale


class GPT2Attention(nnx.Module):
    def __init__(self, config, layer_idx: int, precision: Precision, rngs: nnx.Rngs):
        hidden = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.scale = attention_scale(config, layer_idx)
        # c_attn: fused [E] -> [q | k | v], each [E]
        self.c_attn = layers.conv1d(hidden, 3 * hidden, ("embed", "heads"), precision, rngs)
        self.c_proj = layers.conv1d(hidden, hidden, ("heads", "embed"), precision, rngs)
        self.attn_dropout = layers.dropout(config.attn_pdrop, rngs)
        self.resid_dropout = layers.dropout(config.resid_pdrop, rngs)
        self.implementation = precision.attention

    def __call__(self, hidden_states, step: DecoderStep, layer_cache, bias):
        q, k, v = (
            layers.split_heads(x, self.num_heads)  # [B, T, H, D]
            for x in jnp.split(self.c_attn(hidden_states), 3, axis=-1)
        )
        k, v, layer_cache = step.keys_values(layer_cache, k, v)  # [B, S, H, D]
        context, probs = layers.dot_product_attention(
            q, k, v, bias, self.attn_dropout, scale=self.scale,
            implementation=self.implementation, output_attentions=step.output_attentions,
        )  # fmt: skip
        return self.resid_dropout(self.c_proj(layers.merge_heads(context))), probs, layer_cache


class GPT2MLP(nnx.Module):
    def __init__(self, config, inner: int, precision: Precision, rngs: nnx.Rngs):
        hidden = config.hidden_size
        self.c_fc = layers.conv1d(hidden, inner, ("embed", "mlp"), precision, rngs)
        self.c_proj = layers.conv1d(inner, hidden, ("mlp", "embed"), precision, rngs)
        self.act = layers.activation(config.activation_function, "activation_function")
        self.dropout = layers.dropout(config.resid_pdrop, rngs)

    def __call__(self, hidden_states):
        return self.dropout(self.c_proj(self.act(self.c_fc(hidden_states))))


class GPT2Block(nnx.Module):
    """Pre-norm: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, config, layer_idx: int, precision: Precision, rngs: nnx.Rngs):
        hidden, eps = config.hidden_size, config.layer_norm_epsilon
        inner = config.n_inner if config.n_inner is not None else 4 * hidden
        self.ln_1 = layers.layer_norm(hidden, eps, precision, rngs)
        self.attn = GPT2Attention(config, layer_idx, precision, rngs)
        self.ln_2 = layers.layer_norm(hidden, eps, precision, rngs)
        self.mlp = GPT2MLP(config, inner, precision, rngs)

    def __call__(self, hidden_states, step: DecoderStep, layer_cache, bias):
        attended, probs, layer_cache = self.attn(self.ln_1(hidden_states), step, layer_cache, bias)
        hidden_states = hidden_states + attended
        return hidden_states + self.mlp(self.ln_2(hidden_states)), probs, layer_cache


class GPT2Model(DecoderBackbone):
    """The GPT-2 backbone: token + learned position embeddings, blocks, final LayerNorm."""

    def __init__(
        self, config, precision: Precision, rngs: nnx.Rngs, *, scan_layers=False, remat=False
    ):
        check_config(config)
        if scan_layers and config.scale_attn_by_inverse_layer_idx:
            raise NotImplementedError(
                "scale_attn_by_inverse_layer_idx=True with scan_layers=True is not implemented "
                "for gpt2 (its layers then differ)"
            )
        hidden, heads = config.hidden_size, config.num_attention_heads
        self.wte = layers.embedding(config.vocab_size, hidden, ("vocab", "embed"), precision, rngs)
        self.wpe = layers.embedding(
            config.max_position_embeddings, hidden, (None, "embed"), precision, rngs
        )
        self.drop = layers.dropout(config.embd_pdrop, rngs)
        self.h = self.layer_stack(
            lambda index, rngs: GPT2Block(config, index, precision, rngs),
            config.num_hidden_layers, rngs, scan_layers, remat,
        )  # fmt: skip
        self.ln_f = layers.layer_norm(hidden, config.layer_norm_epsilon, precision, rngs)
        self.cache_shape = (config.num_hidden_layers, heads, hidden // heads)
        self.compute_dtype = precision.dtype

    def get_input_embeddings(self) -> nnx.Embed:
        return self.wte

    @property
    def stack(self):
        return self.h

    def __call__(
        self,
        *,
        input_ids=None,  # [B, T]
        attention_mask=None,  # [B, T], 1 = token, 0 = padding (with a cache: the new tokens)
        token_type_ids=None,  # [B, T], embedded with wte as transformers does
        position_ids=None,  # [B or 1, T]
        inputs_embeds=None,  # [B, T, E]
        cache: KVCache | None = None,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
    ) -> BaseModelOutputWithPast:
        embeds, step, position_ids = self.begin(
            self.wte, input_ids, inputs_embeds, attention_mask, position_ids, cache, (None,)
        )
        hidden = embeds + self.wpe(position_ids)
        if token_type_ids is not None:
            hidden = hidden + self.wte(token_type_ids)
        return self.finish(
            self.drop(hidden),
            step,
            self.ln_f,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
        )


#: What GPT-2 reads from the config (flaxauto.config_checks refuses the rest).
CONFIG_ATTRIBUTES = (
    "vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner", "activation_function",
    "resid_pdrop", "embd_pdrop", "attn_pdrop", "layer_norm_epsilon", "scale_attn_weights",
    "scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn", "pad_token_id",
    "tie_word_embeddings",
    # only the values check_config accepts
    "add_cross_attention",
    # GPT2ForTokenClassification's dropout, when present
    "classifier_dropout", "hidden_dropout",
    # read only by GPT2DoubleHeadsModel, which flaxauto does not serve
    "summary_type", "summary_use_proj", "summary_activation", "summary_proj_to_labels",
    "summary_first_dropout", "summary_last_dropout",
    # old configs' name for n_positions; transformers reads it nowhere
    "n_ctx",
)  # fmt: skip

#: transformers fixes GPT-2's span head at 2 outputs, whatever num_labels says
QA = HeadSpec(QuestionAnsweringHead, options={"num_outputs": 2})

register(
    model_types=("gpt2",),
    backbone=GPT2Model,
    base_model_prefix="transformer",
    ignored=("attn.bias", "attn.masked_bias"),  # causal masks older transformers saved
    config_attributes=CONFIG_ATTRIBUTES,
    heads={
        "base": HeadSpec(None),
        "causal-lm": HeadSpec(CausalLMHead),
        "sequence-classification": HeadSpec(
            SequenceClassificationHead,
            names={"classifier.out": "score"},
            options={"pooling": "last_token", "use_bias": False, "dropout_rate": 0.0},
        ),
        "token-classification": HeadSpec(TokenClassificationHead),
        "question-answering": QA,
    },
)
