"""The attention primitive against transformers' own attention modules, fed the same weights:
BART's cross attention with a padding mask, T5's relative position bias as a per-head bias (with
inner_dim != hidden and no score scale), Llama's grouped-query attention, DETR's positions added
to queries and keys only. Then the fused path (jax.nn.dot_product_attention) against the eager
one: on the primitive, and for every family through the model option attn_implementation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

import flaxauto
from flaxauto import layers, rope
from references import DECODERS, max_diff, task_inputs, text_inputs, torch_model

TOLERANCE = 1e-5
BATCH, T, S, E = 2, 5, 7, 32


def _eager(config):
    config._attn_implementation = "eager"
    return config


def linear_like(torch_linear: torch.nn.Linear) -> nnx.Linear:
    """A flaxauto linear holding a torch Linear's weights."""
    out_features, in_features = torch_linear.weight.shape
    use_bias = torch_linear.bias is not None
    ours = layers.linear(
        in_features, out_features, (None, None), layers.Precision(), nnx.Rngs(0), use_bias=use_bias
    )
    ours.kernel.set_value(jnp.asarray(torch_linear.weight.detach().numpy().T))
    if use_bias:
        ours.bias.set_value(jnp.asarray(torch_linear.bias.detach().numpy()))
    return ours


def randomize(module: torch.nn.Module, seed: int = 0, std: float = 0.3) -> torch.nn.Module:
    """Weights large enough that attention is far from uniform."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(std * torch.randn(param.shape, generator=generator))
    return module.eval()


def rand(*shape, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def padding(lengths, total: int) -> np.ndarray:
    """[B, total] 1/0 mask, right-padded to the given lengths."""
    return (np.arange(total)[None, :] < np.asarray(lengths)[:, None]).astype(np.int32)


def additive(mask: np.ndarray) -> torch.Tensor:
    """[B, S] 1/0 -> transformers' 4-D additive mask [B, 1, 1, S]."""
    return torch.as_tensor(np.asarray(layers.padding_bias(jnp.asarray(mask))))


def test_cross_attention_with_padding_matches_bart():
    config = _eager(transformers.BartConfig(d_model=E, decoder_attention_heads=4))
    reference = randomize(transformers.models.bart.modeling_bart.BartAttention(E, 4, config=config))
    hidden, encoder = rand(BATCH, T, E, seed=1), rand(BATCH, S, E, seed=2)
    mask = padding([S, 3], S)
    with torch.no_grad():
        expected, expected_probs = reference(
            torch.as_tensor(hidden), key_value_states=torch.as_tensor(encoder),
            attention_mask=additive(mask),
        )  # fmt: skip
    projections = tuple(linear_like(getattr(reference, n)) for n in ("q_proj", "k_proj", "v_proj"))
    context, probs = layers.attend(
        projections, jnp.asarray(hidden), jnp.asarray(encoder), num_heads=4,
        bias=layers.padding_bias(jnp.asarray(mask)),
    )  # fmt: skip
    assert max_diff(linear_like(reference.out_proj)(context), expected) <= TOLERANCE
    assert max_diff(probs, expected_probs) <= TOLERANCE
    assert probs.shape == (BATCH, 4, T, S)


def test_relative_position_bias_per_head_matches_t5():
    # inner_dim = 4 heads x d_kv 12 = 48 != d_model 32; T5 does not scale the scores
    config = _eager(
        transformers.T5Config(
            d_model=E, d_kv=12, num_heads=4, relative_attention_num_buckets=8,
            relative_attention_max_distance=16, dropout_rate=0.0,
        )
    )  # fmt: skip
    reference = randomize(
        transformers.models.t5.modeling_t5.T5Attention(config, has_relative_attention_bias=True),
        std=1.0,
    )
    hidden, mask = rand(BATCH, T, E, seed=3), padding([T, 2], T)
    with torch.no_grad():
        expected, position_bias, expected_probs = reference(
            torch.as_tensor(hidden), mask=additive(mask)
        )
    assert position_bias.shape == (1, 4, T, T)  # one bias per head, shared by the batch
    assert float(position_bias.std()) > 0.1  # a bias that moves the scores
    projections = tuple(linear_like(getattr(reference, n)) for n in ("q", "k", "v"))
    context, probs = layers.attend(
        projections, jnp.asarray(hidden), num_heads=4, scale=1.0,
        bias=layers.padding_bias(jnp.asarray(mask)), head_bias=jnp.asarray(position_bias.numpy()),
    )  # fmt: skip
    assert context.shape == (BATCH, T, 48)
    assert max_diff(linear_like(reference.o)(context), expected) <= TOLERANCE
    assert max_diff(probs, expected_probs) <= TOLERANCE


def test_grouped_query_attention_matches_llama():
    config = _eager(
        transformers.LlamaConfig(
            hidden_size=E, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            attention_bias=True,
        )
    )  # fmt: skip
    reference = randomize(transformers.models.llama.modeling_llama.LlamaAttention(config, 0))
    rotary = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(config)
    hidden = rand(BATCH, T, E, seed=4)
    positions = torch.arange(T)[None].expand(BATCH, T)
    cos, sin = rotary(torch.as_tensor(hidden), positions)
    causal = np.tril(np.ones((T, T), bool))
    bias = np.where(causal, 0.0, np.finfo(np.float32).min)[None, None].astype(np.float32)
    with torch.no_grad():
        expected, expected_probs = reference(
            torch.as_tensor(hidden), (cos, sin), attention_mask=torch.as_tensor(bias)
        )
    names = ("q_proj", "k_proj", "v_proj")
    q, k, v = layers.attention_heads(
        tuple(linear_like(getattr(reference, n)) for n in names), jnp.asarray(hidden),
        num_heads=4, num_kv_heads=2,
    )  # fmt: skip
    assert k.shape == (BATCH, T, 2, 16)
    cos, sin = jnp.asarray(cos.numpy()), jnp.asarray(sin.numpy())
    q, k = rope.apply_rotary(q, cos, sin), rope.apply_rotary(k, cos, sin)
    context, probs = layers.dot_product_attention(q, k, v, jnp.asarray(bias))
    output = linear_like(reference.o_proj)(layers.merge_heads(context))
    assert max_diff(output, expected) <= TOLERANCE
    assert max_diff(probs, expected_probs) <= TOLERANCE


def detr_pair(kind: str):
    config = _eager(transformers.DetrConfig(d_model=E, use_pretrained_backbone=False))
    module = getattr(transformers.models.detr.modeling_detr, f"Detr{kind}Attention")
    reference = randomize(module(config, E, 4))
    names = ("q_proj", "k_proj", "v_proj")
    return reference, tuple(linear_like(getattr(reference, n)) for n in names)


def test_positions_on_queries_and_keys_only_match_detr_self_attention():
    reference, projections = detr_pair("Self")
    hidden, positions = rand(BATCH, T, E, seed=5), rand(BATCH, T, E, seed=6)
    with torch.no_grad():
        expected, _ = reference(
            torch.as_tensor(hidden), position_embeddings=torch.as_tensor(positions)
        )
    context, _ = layers.attend(
        projections, jnp.asarray(hidden), num_heads=4, query_positions=jnp.asarray(positions)
    )
    assert max_diff(linear_like(reference.o_proj)(context), expected) <= TOLERANCE
    # the values saw no positions: adding them there too would change the output
    q, k, _ = layers.attention_heads(
        projections, jnp.asarray(hidden), num_heads=4, query_positions=jnp.asarray(positions)
    )
    v_with_positions = layers.split_heads(projections[2](jnp.asarray(hidden + positions)), 4)
    wrong, _ = layers.dot_product_attention(q, k, v_with_positions)
    assert max_diff(linear_like(reference.o_proj)(layers.merge_heads(wrong)), expected) > 1e-2


def test_positions_match_detr_cross_attention_with_padding():
    reference, projections = detr_pair("Cross")
    hidden, queries = rand(BATCH, T, E, seed=7), rand(BATCH, T, E, seed=8)
    encoder, encoder_positions = rand(BATCH, S, E, seed=9), rand(BATCH, S, E, seed=10)
    mask = padding([S, 4], S)
    with torch.no_grad():
        expected, expected_probs = reference(
            torch.as_tensor(hidden), torch.as_tensor(encoder), attention_mask=additive(mask),
            position_embeddings=torch.as_tensor(queries),
            encoder_position_embeddings=torch.as_tensor(encoder_positions),
        )  # fmt: skip
    context, probs = layers.attend(
        projections, jnp.asarray(hidden), jnp.asarray(encoder), num_heads=4,
        bias=layers.padding_bias(jnp.asarray(mask)), query_positions=jnp.asarray(queries),
        key_positions=jnp.asarray(encoder_positions),
    )  # fmt: skip
    assert max_diff(linear_like(reference.o_proj)(context), expected) <= TOLERANCE
    assert max_diff(probs, expected_probs) <= TOLERANCE


# --- the fused path ------------------------------------------------------------------------------

FUSED_TOLERANCE = 1e-5

PRIMITIVE_CASES = {
    "multi-head": dict(heads=4, kv_heads=4),
    "grouped": dict(heads=4, kv_heads=2),
    "multi-query": dict(heads=4, kv_heads=1),
    "per-head-bias": dict(heads=4, kv_heads=2, head_bias=True),
    "batch-per-head-bias": dict(heads=4, kv_heads=4, head_bias="batch"),
    "sliding-window": dict(heads=4, kv_heads=2, window=3),
    # every slot of a row masked (decoders' left padding): uniform, as transformers' eager
    "nothing-to-attend": dict(heads=4, kv_heads=2, head_bias=True, masked_row=True),
}


@pytest.mark.parametrize("name", sorted(PRIMITIVE_CASES))
def test_fused_primitive_matches_eager(name):
    case = PRIMITIVE_CASES[name]
    heads, kv_heads, depth = case["heads"], case["kv_heads"], 8
    q = jnp.asarray(rand(BATCH, T, heads, depth, seed=11)) * 2
    k = jnp.asarray(rand(BATCH, S, kv_heads, depth, seed=12)) * 2
    v = jnp.asarray(rand(BATCH, S, kv_heads, depth, seed=13))
    allowed = padding([S, 4], S).astype(bool)[:, None, None, :]  # [B, 1, 1, S]
    if "window" in case:  # queries at slots S-T..S-1, a causal sliding window over the keys
        query_slots = np.arange(S - T, S)[:, None]
        key_slots = np.arange(S)[None, :]
        near = (key_slots <= query_slots) & (key_slots > query_slots - case["window"])
        allowed = allowed & near[None, None]
    if case.get("masked_row"):
        allowed = allowed & (np.arange(BATCH) != 1)[:, None, None, None]
    bias = jnp.where(jnp.asarray(allowed), 0.0, jnp.finfo(jnp.float32).min)
    head_bias = None
    if case.get("head_bias"):
        batch = BATCH if case["head_bias"] == "batch" else 1
        head_bias = jnp.asarray(rand(batch, heads, T, S, seed=14))
    eager, probs = layers.dot_product_attention(q, k, v, bias, head_bias=head_bias)
    fused, none = layers.dot_product_attention(
        q, k, v, bias, head_bias=head_bias, implementation="fused"
    )
    assert none is None  # the fused kernel returns no probabilities
    assert max_diff(fused, eager) <= FUSED_TOLERANCE
    jitted = jax.jit(
        lambda q, k, v: layers.dot_product_attention(
            q, k, v, bias, head_bias=head_bias, implementation="fused"
        )[0]
    )
    assert max_diff(jitted(q, k, v), eager) <= FUSED_TOLERANCE
    # asked for probabilities, the fused option falls back to eager
    _, fallback = layers.dot_product_attention(
        q, k, v, bias, head_bias=head_bias, implementation="fused", output_attentions=True
    )
    assert max_diff(fallback, probs) == 0


def test_attention_option_is_resolved_and_refused_by_name():
    assert layers.attention_implementation(None, backend="cpu") == "eager"
    assert layers.attention_implementation(None, backend="gpu") == "fused"
    assert layers.attention_implementation(None, backend="tpu") == "fused"
    assert layers.attention_implementation("sdpa") == "fused"
    with pytest.raises(NotImplementedError, match="flash_attention_2"):
        layers.attention_implementation("flash_attention_2")
    with pytest.raises(NotImplementedError, match="attn_implementation"):
        flaxauto.AutoModel.from_config(
            transformers.BertConfig(**_tiny_bert()), attn_implementation="flex_attention"
        )
    model = flaxauto.AutoModel.from_config(transformers.BertConfig(**_tiny_bert()))
    chosen = model.backbone.encoder.layer[0].attention.self.implementation
    assert chosen == layers.attention_implementation(None)  # eager on CPU, fused on GPU/TPU


def _tiny_bert() -> dict:
    return dict(
        vocab_size=99, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
        intermediate_size=37,
    )  # fmt: skip


FAMILY_TASKS = {
    "bert": "base",
    "roberta": "base",
    "xlm-roberta": "base",
    "distilbert": "base",
    "gpt2": "causal-lm",
    "llama": "causal-lm",  # grouped-query, head_dim != hidden / heads
    "mistral": "causal-lm",  # multi-query, a sliding window shorter than the inputs
    "qwen2": "causal-lm",  # a full-attention layer, then a sliding one
    "vit": "base",
    "beit": "base",  # relative position biases per head
    "videomae": "base",
}


@pytest.fixture(scope="module", params=sorted(FAMILY_TASKS))
def family_pair(request, tmp_path_factory):
    """The same checkpoint loaded with eager and with fused attention."""
    model_type = request.param
    task = FAMILY_TASKS[model_type]
    directory = tmp_path_factory.mktemp(f"fused-{model_type}")
    torch_model(model_type, task, initializer_range=0.25).save_pretrained(directory)
    auto = getattr(flaxauto, flaxauto.registry.TASK_AUTO_CLASSES[task])
    eager = auto.from_pretrained(directory, attn_implementation="eager")
    fused = auto.from_pretrained(directory, attn_implementation="fused")
    return model_type, task, eager, fused


def test_fused_option_matches_eager_for_every_family(family_pair):
    model_type, task, eager, fused = family_pair
    inputs = task_inputs(model_type, task)  # padded text
    field = "logits" if task == "causal-lm" else "last_hidden_state"
    expected = getattr(eager(**inputs), field)
    forward = jax.jit(lambda model, batch: getattr(model(**batch), field))
    # every position, left padding's queries with nothing to attend included (span losses
    # read their logits)
    assert max_diff(forward(fused, inputs), expected) <= 1e-4
    # output_attentions falls back to the eager path, probabilities included
    ours = fused(**inputs, output_attentions=True)
    theirs = eager(**inputs, output_attentions=True)
    for a, b in zip(ours.attentions, theirs.attentions, strict=True):
        assert max_diff(a, b) == 0


@pytest.mark.parametrize("family_pair", sorted(DECODERS), indirect=True)
def test_fused_option_decodes_with_the_cache_like_eager(family_pair):
    model_type, task, eager, fused = family_pair
    inputs = text_inputs(model_type, task)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    ours = fused.generate(ids, attention_mask=mask, max_new_tokens=6, eos_token_id=None)
    theirs = eager.generate(ids, attention_mask=mask, max_new_tokens=6, eos_token_id=None)
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))


def test_fused_path_falls_back_to_eager_while_dropout_is_active():
    q = jnp.asarray(rand(BATCH, T, 4, 8, seed=15))
    k, v = (jnp.asarray(rand(BATCH, S, 2, 8, seed=seed)) for seed in (16, 17))

    def attention(deterministic: bool, implementation: str):
        dropout = nnx.Dropout(0.5, deterministic=deterministic, rngs=nnx.Rngs(dropout=3))
        return layers.dot_product_attention(q, k, v, None, dropout, implementation=implementation)

    dropped, probs = attention(False, "fused")  # training: the fused kernel cannot drop probs
    assert probs is not None
    assert max_diff(dropped, attention(False, "eager")[0]) == 0  # the same draw
    assert max_diff(dropped, attention(True, "eager")[0]) > 1e-2  # something was dropped
    context, none = attention(True, "fused")  # evaluation: fused
    assert none is None and max_diff(context, attention(True, "eager")[0]) <= FUSED_TOLERANCE
