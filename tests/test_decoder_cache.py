"""The decoder stack and its cache, for decoders with cross attention (encoder-decoders) and
causal LMs alike.

No encoder-decoder family exists yet, so a small test-local decoder is built from the attention
primitive and DecoderBackbone (self attention over the growing cache, cross attention over the
encoder output): decoding token by token with the cache equals the full forward without one; the
cross part is computed once; `reorder` moves both parts; stacked and unrolled layouts agree; every
cache array carries logical axes, so the cache shards under a mesh (a causal LM's too, with the
same logits as unsharded).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import flaxauto
from flaxauto import layers
from flaxauto.decoder import (
    CrossAttentionCache,
    DecoderBackbone,
    DecoderStep,
    EncoderDecoderCache,
    KVCache,
)
from flaxauto.sharding import cache_shardings, shard_cache
from references import max_diff, text_inputs, torch_model

VOCAB, HIDDEN, ENCODER_HIDDEN, HEADS, KV_HEADS, HEAD_DIM, LAYERS = 50, 32, 24, 4, 2, 8, 2
BATCH, LENGTH, ENCODER_LENGTH, PROMPT = 2, 7, 6, 3
TOLERANCE = 1e-5

#: how many times a layer projected the encoder output into cross keys/values (eager runs)
CROSS_PROJECTIONS: list[int] = []


class CrossDecoderLayer(nnx.Module):
    """Pre-norm: x + self_attn(norm(x)), x + cross_attn(norm(x), encoder), x + mlp(norm(x));
    grouped heads, inner_dim = 4 * 8 = 32, encoder width 24."""

    def __init__(self, precision: layers.Precision, rngs: nnx.Rngs):
        def linear(i, o, axes):
            return layers.linear(i, o, axes, precision, rngs)

        inner, kv_inner = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
        self.q, self.o = (
            linear(HIDDEN, inner, ("embed", "heads")),
            linear(inner, HIDDEN, (None, None)),
        )
        self.k, self.v = (linear(HIDDEN, kv_inner, ("embed", "kv")) for _ in range(2))
        self.cross_q = linear(HIDDEN, inner, ("embed", "heads"))
        self.cross_k, self.cross_v = (linear(ENCODER_HIDDEN, kv_inner, (None, "kv")) for _ in "kv")
        self.cross_o = linear(inner, HIDDEN, ("heads", "embed"))
        self.fc1, self.fc2 = (
            linear(HIDDEN, 37, ("embed", "mlp")),
            linear(37, HIDDEN, ("mlp", "embed")),
        )
        self.norms = nnx.List([layers.layer_norm(HIDDEN, 1e-5, precision, rngs) for _ in range(3)])
        self.implementation = precision.attention

    def __call__(self, hidden, step: DecoderStep, layer_cache, bias):
        attention = dict(
            implementation=self.implementation, output_attentions=step.output_attentions
        )
        q, k, v = layers.attention_heads(
            (self.q, self.k, self.v), self.norms[0](hidden), num_heads=HEADS, num_kv_heads=KV_HEADS
        )
        k, v, layer_cache = step.keys_values(layer_cache, k, v)
        context, probs = layers.dot_product_attention(q, k, v, bias, **attention)
        hidden = hidden + self.o(layers.merge_heads(context))

        def project(encoder):  # [B, S_enc, E_enc] -> keys, values [B, S_enc, K, D]
            CROSS_PROJECTIONS.append(1)
            return (
                layers.split_heads(self.cross_k(encoder), KV_HEADS),
                layers.split_heads(self.cross_v(encoder), KV_HEADS),
            )

        q = layers.split_heads(self.cross_q(self.norms[1](hidden)), HEADS)
        k, v, layer_cache = step.cross_keys_values(layer_cache, project)
        context, cross_probs = layers.dot_product_attention(q, k, v, step.cross_bias, **attention)
        hidden = hidden + self.cross_o(layers.merge_heads(context))
        hidden = hidden + self.fc2(jax.nn.gelu(self.fc1(self.norms[2](hidden))))
        return hidden, (probs, cross_probs), layer_cache  # a cross decoder's layers: both


class CrossDecoder(DecoderBackbone):
    cross_attention = True

    def __init__(self, precision: layers.Precision, rngs: nnx.Rngs, *, scan_layers=False):
        self.embed_tokens = layers.embedding(VOCAB, HIDDEN, ("vocab", "embed"), precision, rngs)
        self.embed_positions = layers.embedding(32, HIDDEN, (None, "embed"), precision, rngs)
        self.layers = self.layer_stack(
            lambda _, rngs: CrossDecoderLayer(precision, rngs), LAYERS, rngs, scan_layers, False
        )
        self.norm = layers.layer_norm(HIDDEN, 1e-5, precision, rngs)
        self.cache_shape = (LAYERS, KV_HEADS, HEAD_DIM)
        self.compute_dtype = precision.dtype

    @property
    def stack(self):
        return self.layers

    def __call__(
        self, input_ids, attention_mask=None, encoder_hidden_states=None,
        encoder_attention_mask=None, cache=None, output_hidden_states=False,
        output_attentions=False,
    ):  # fmt: skip
        embeds, step, positions = self.begin(
            self.embed_tokens, input_ids, None, attention_mask, None, cache, (None,),
            encoder_hidden_states=encoder_hidden_states,
            encoder_attention_mask=encoder_attention_mask,
        )  # fmt: skip
        return self.finish(
            embeds + self.embed_positions(positions), step, self.norm,
            output_hidden_states=output_hidden_states, output_attentions=output_attentions,
        )  # fmt: skip


def _random_like(state, seed: int):
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    noise = [
        0.3 * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves, strict=True)
    ]
    return jax.tree.unflatten(treedef, noise)


@pytest.fixture(scope="module")
def decoders():
    """The same weights unrolled and stacked (scan_layers)."""
    precision = layers.Precision()
    unrolled = CrossDecoder(precision, nnx.Rngs(0))
    nnx.update(unrolled, _random_like(nnx.state(unrolled, nnx.Param), seed=1))
    scanned = CrossDecoder(precision, nnx.Rngs(0), scan_layers=True)
    per_layer = [nnx.state(layer, nnx.Param) for layer in unrolled.layers]
    nnx.update(scanned.layers.block, jax.tree.map(lambda *xs: jnp.stack(xs), *per_layer))
    for name in ("embed_tokens", "embed_positions", "norm"):
        nnx.update(getattr(scanned, name), nnx.state(getattr(unrolled, name), nnx.Param))
    return {"unrolled": unrolled, "scanned": scanned}


def _batch():
    rng = np.random.default_rng(0)
    ids = rng.integers(1, VOCAB, size=(BATCH, LENGTH)).astype(np.int32)
    mask = np.ones((BATCH, LENGTH), np.int32)
    mask[1, :2] = 0  # row 1 left-padded
    encoder = rng.normal(size=(BATCH, ENCODER_LENGTH, ENCODER_HIDDEN)).astype(np.float32)
    encoder_mask = np.ones((BATCH, ENCODER_LENGTH), np.int32)
    encoder_mask[0, 4:] = 0  # row 0's encoder output right-padded
    return ids, mask, encoder, encoder_mask


def _real(x, mask):
    return np.where(mask[..., None].astype(bool), np.asarray(x), 0)


@functools.cache
def _compiled(graphdef):
    return jax.jit(lambda state, inputs: nnx.merge(graphdef, state)(**inputs))


def run(model, **inputs):
    """model(**inputs) under jit over its split state (eager NNX dispatch is slow)."""
    graphdef, state = nnx.split(model)
    return _compiled(graphdef)(state, inputs)


def _decode(model, ids, mask, encoder, encoder_mask, forward=run):
    """Prefill PROMPT tokens with the encoder output, then one token per call, without it."""
    cache = model.init_cache(BATCH, LENGTH + 1)
    out = forward(
        model, input_ids=ids[:, :PROMPT], attention_mask=mask[:, :PROMPT],
        encoder_hidden_states=encoder, encoder_attention_mask=encoder_mask, cache=cache,
    )  # fmt: skip
    hidden, cache = [out.last_hidden_state], out.cache
    for t in range(PROMPT, ids.shape[1]):
        out = forward(
            model, input_ids=ids[:, t : t + 1], attention_mask=mask[:, t : t + 1], cache=cache
        )
        hidden.append(out.last_hidden_state)
        cache = out.cache
    return np.concatenate([np.asarray(h) for h in hidden], axis=1), cache


@pytest.fixture(scope="module")
def decoded(decoders):
    """Each layout's decoding of _batch() token by token: (hidden states, final cache)."""
    ids, mask, encoder, encoder_mask = _batch()
    return {
        layout: _decode(model, ids, mask, encoder, encoder_mask)
        for layout, model in decoders.items()
    }


@pytest.mark.parametrize("layout", ["unrolled", "scanned"])
def test_cached_decoding_equals_the_full_forward(decoders, decoded, layout):
    model = decoders[layout]
    ids, mask, encoder, encoder_mask = _batch()
    full = run(
        model, input_ids=ids, attention_mask=mask, encoder_hidden_states=encoder,
        encoder_attention_mask=encoder_mask,
    ).last_hidden_state  # fmt: skip
    assert full.shape == (BATCH, LENGTH, HIDDEN)
    stepped, cache = decoded[layout]
    assert max_diff(_real(stepped, mask), _real(full, mask)) <= TOLERANCE
    # the encoder's padding was attended as the full forward did: change it, the outputs move
    other = run(
        model, input_ids=ids, attention_mask=mask, encoder_hidden_states=encoder,
        encoder_attention_mask=np.ones_like(encoder_mask),
    ).last_hidden_state  # fmt: skip
    assert max_diff(_real(other, mask)[0], _real(full, mask)[0]) > 1e-3
    assert isinstance(cache, EncoderDecoderCache)
    assert int(cache.length) == LENGTH
    np.testing.assert_array_equal(cache.cross_attention.mask, encoder_mask)


def test_the_cross_part_is_computed_once(decoders):
    model = decoders["unrolled"]
    ids, mask, encoder, encoder_mask = _batch()
    CROSS_PROJECTIONS.clear()
    cache = model.init_cache(BATCH, LENGTH)
    assert cache.cross_attention is None
    out = model(
        ids[:, :PROMPT], attention_mask=mask[:, :PROMPT], encoder_hidden_states=encoder,
        encoder_attention_mask=encoder_mask, cache=cache,
    )  # fmt: skip
    assert len(CROSS_PROJECTIONS) == LAYERS  # once per layer, at the prefill
    cross = out.cache.cross_attention
    layer = model.layers[1]
    expected = layers.split_heads(layer.cross_k(jnp.asarray(encoder)), KV_HEADS)  # [B, S, K, D]
    assert max_diff(cross.keys[1], jnp.swapaxes(expected, 1, 2)) == 0  # stored [B, K, S, D]
    step = model(
        ids[:, PROMPT : PROMPT + 1], attention_mask=mask[:, PROMPT : PROMPT + 1], cache=out.cache
    )
    assert len(CROSS_PROJECTIONS) == LAYERS  # the step reused the cached part
    # given the encoder output again, the step still uses the cached part (as transformers)
    again = model(
        ids[:, PROMPT : PROMPT + 1], attention_mask=mask[:, PROMPT : PROMPT + 1],
        encoder_hidden_states=np.zeros_like(encoder), cache=out.cache,
    )  # fmt: skip
    assert len(CROSS_PROJECTIONS) == LAYERS
    assert max_diff(again.last_hidden_state, step.last_hidden_state) == 0
    assert step.cache.cross_attention is cross or all(
        np.array_equal(a, b)
        for a, b in zip(
            jax.tree.leaves(step.cache.cross_attention), jax.tree.leaves(cross), strict=True
        )
    )


def test_a_step_without_encoder_output_or_cross_cache_is_refused(decoders):
    model = decoders["unrolled"]
    ids, mask, _, _ = _batch()
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        model(ids[:, :PROMPT], cache=model.init_cache(BATCH, LENGTH))
    causal_cache = KVCache.create(BATCH, LENGTH, (LAYERS, KV_HEADS, HEAD_DIM), jnp.float32)
    with pytest.raises(TypeError, match="EncoderDecoderCache"):
        model(ids[:, :PROMPT], cache=causal_cache)
    with pytest.raises(ValueError, match="layout"):
        model(ids[:, :PROMPT], cache=decoders["scanned"].init_cache(BATCH, LENGTH))


@pytest.mark.parametrize("layout", ["unrolled", "scanned"])
def test_reorder_moves_both_parts(decoders, layout):
    model = decoders[layout]
    ids, mask, encoder, encoder_mask = _batch()
    _, cache = _decode(model, ids[:, :-1], mask[:, :-1], encoder, encoder_mask)
    rows = np.array([1, 1])
    moved = cache.reorder(rows)
    for part in ("self_attention", "cross_attention"):
        before, after = getattr(cache, part), getattr(moved, part)
        for name in ("keys", "values"):
            for layer in range(LAYERS):  # per-layer tuples and stacked arrays index alike
                np.testing.assert_array_equal(
                    getattr(after, name)[layer], np.asarray(getattr(before, name)[layer])[rows]
                )
        np.testing.assert_array_equal(after.mask, np.asarray(before.mask)[rows])
    assert int(moved.length) == int(cache.length)
    # decoding on from the moved cache = decoding row 1 in both rows
    last = ids[:, -1:][rows]
    out = run(model, input_ids=last, attention_mask=mask[:, -1:][rows], cache=moved)
    expected = run(model, input_ids=ids[:, -1:], attention_mask=mask[:, -1:], cache=cache)
    expected = expected.last_hidden_state
    assert max_diff(out.last_hidden_state, np.asarray(expected)[rows]) <= TOLERANCE


def test_stacked_and_unrolled_layouts_agree(decoded):
    _, mask, _, _ = _batch()
    unrolled_hidden, unrolled = decoded["unrolled"]
    scanned_hidden, scanned = decoded["scanned"]
    assert max_diff(_real(unrolled_hidden, mask), _real(scanned_hidden, mask)) <= TOLERANCE
    assert not unrolled.stacked and scanned.stacked
    for part in ("self_attention", "cross_attention"):
        for name in ("keys", "values"):
            per_layer, stacked = (
                getattr(getattr(unrolled, part), name),
                getattr(getattr(scanned, part), name),
            )
            assert stacked.shape == (LAYERS, *per_layer[0].shape)
            assert max_diff(np.stack(per_layer), stacked) <= TOLERANCE


def _named_arrays(cache) -> list:
    named = []
    cache.map_arrays(lambda x, axes: named.append((x.shape, axes)))
    return named


def test_every_cache_array_names_its_logical_axes(decoded):
    for layout, (_, cache) in decoded.items():
        named = _named_arrays(cache)
        assert len(named) == len(jax.tree.leaves(cache))
        for shape, axes in named:
            assert len(axes) == len(shape), (layout, shape, axes)
        stacked_axes = {axes for _, axes in named if "layers" in axes}
        assert bool(stacked_axes) == (layout == "scanned")


def test_the_encoder_decoder_cache_shards_under_a_mesh(decoders, decoded):
    model = decoders["unrolled"]
    mesh = flaxauto.make_mesh(data=2, fsdp=4)
    ids = _batch()[0]
    _, cache = decoded["unrolled"]
    sharded = shard_cache(cache, mesh, "fsdp")
    for part in (sharded.self_attention, sharded.cross_attention):
        for x in (*part.keys, *part.values, part.mask):
            assert not x.sharding.is_fully_replicated
            assert x.sharding.spec[0] == "data"  # the batch of 2 splits over data
    # a step on the sharded cache gives the unsharded step's output, and keeps it sharded
    graphdef, state = nnx.split(model)
    step = jax.jit(lambda state, ids, cache: nnx.merge(graphdef, state)(ids, cache=cache))
    out = step(state, ids[:, -1:], sharded)
    expected = step(state, ids[:, -1:], cache)
    assert max_diff(out.last_hidden_state, expected.last_hidden_state) <= TOLERANCE
    assert not out.cache.self_attention.keys[0].sharding.is_fully_replicated


@pytest.fixture(scope="module")
def llama_pair(tmp_path_factory):
    directory = tmp_path_factory.mktemp("llama-mesh")
    torch_model("llama", "causal-lm", initializer_range=0.25).save_pretrained(directory)
    return flaxauto.AutoModelForCausalLM, directory


@pytest.mark.parametrize("rules, mesh_shape", [("fsdp", (2, 4, 1)), ("fsdp+tensor", (2, 2, 2))])
def test_a_causal_lm_cache_made_on_a_mesh_is_sharded_and_decodes_alike(
    llama_pair, rules, mesh_shape
):
    auto, directory = llama_pair
    mesh = flaxauto.make_mesh(*mesh_shape)
    plain = auto.from_pretrained(directory)
    sharded = auto.from_pretrained(directory, mesh=mesh, rules=rules)
    inputs = text_inputs("llama", "causal-lm")  # batch 4, left-padded
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    batch, length = ids.shape
    cache = sharded.init_cache(batch, length + 2, mesh=mesh, rules=rules)
    for x in jax.tree.leaves(cache.keys) + [cache.mask]:
        assert not x.sharding.is_fully_replicated
    # a model loaded onto a mesh makes its caches there by default, with its rules
    default = sharded.init_cache(batch, length + 2)
    assert jax.tree.map(lambda x: x.sharding, default) == jax.tree.map(lambda x: x.sharding, cache)
    assert plain.init_cache(batch, 4).keys[0].sharding.is_fully_replicated
    if rules == "fsdp+tensor":  # the 2 key/value heads follow the "kv" weights over "tensor"
        assert cache.keys[0].sharding.spec[1] == "tensor"
    positions = np.where(mask == 0, 0, np.cumsum(mask, axis=-1) - 1)

    def decode(model, cache):
        graphdef, state = nnx.split(model)

        @jax.jit
        def run(state, cache):
            model = nnx.merge(graphdef, state)
            out = model(ids, attention_mask=mask, position_ids=positions, cache=cache)
            token = jnp.argmax(out.logits[:, -1], axis=-1)[:, None]
            nxt = model(token, position_ids=positions[:, -1:] + 1, cache=out.cache)
            return out.logits, nxt.logits, nxt.cache

        return run(state, cache)

    prefill, step, new_cache = decode(sharded, cache)
    expected_prefill, expected_step, _ = decode(plain, plain.init_cache(batch, length + 2))
    keep = mask.astype(bool)[..., None]
    assert max_diff(np.where(keep, prefill, 0), np.where(keep, expected_prefill, 0)) <= TOLERANCE
    assert max_diff(step, expected_step) <= TOLERANCE
    assert not new_cache.keys[0].sharding.is_fully_replicated


def test_cache_shardings_replicate_what_does_not_divide():
    mesh = flaxauto.make_mesh(data=2, fsdp=4)
    cache = KVCache.create(3, 5, (2, 3, 4), jnp.float32)  # batch 3, 3 heads: nothing divides
    shardings = cache_shardings(cache, mesh, "fsdp+tensor")
    assert all(s.is_fully_replicated for s in jax.tree.leaves(shardings))
    cross = CrossAttentionCache(
        keys=jnp.zeros((2, 8, 2, 5, 4)), values=jnp.zeros((2, 8, 2, 5, 4)),
        mask=jnp.ones((8, 5), jnp.int32),
    )  # fmt: skip
    spec = cache_shardings(cross, mesh).keys.spec
    assert tuple(spec) == (None, ("data", "fsdp"), None, None, None)  # [L, B=8, K, S, D]


@pytest.mark.parametrize("stacked", [False, True])
def test_a_causal_lm_cache_reorders_its_batch_rows(stacked):
    rng = np.random.default_rng(0)
    cache = KVCache.create(3, 8, (2, 2, 4), jnp.float32, stacked=stacked)
    cache = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape).astype(x.dtype)), cache)
    rows = [2, 2, 0]
    moved = cache.reorder(jnp.asarray(rows))
    batch_axis = 1 if stacked else 0  # keys/values [L, B, K, S, D] or per layer [B, K, S, D]
    for name in ("keys", "values"):
        for ours, theirs in zip(
            jax.tree.leaves(getattr(moved, name)),
            jax.tree.leaves(getattr(cache, name)),
            strict=True,
        ):
            np.testing.assert_array_equal(ours, np.take(np.asarray(theirs), rows, batch_axis))
    np.testing.assert_array_equal(moved.mask, np.asarray(cache.mask)[rows])
    np.testing.assert_array_equal(moved.length, cache.length)
