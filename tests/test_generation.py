"""Generation and the KV cache against transformers' PyTorch generate, on tiny random decoders."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import GenerationConfig

import flaxauto
from flaxauto.generation import greedy, processors, settings
from references import text_inputs, tiny_config, torch_model

DECODERS = ("gpt2", "llama", "mistral", "qwen2")
NEW_TOKENS = 40


def one_family(model_type: str):
    """Checks of family-independent code run on one decoder (each program compiles anew)."""
    return pytest.mark.parametrize("pair", [model_type], indirect=True)


@pytest.fixture(scope="module", params=DECODERS)
def pair(request, tmp_path_factory):
    """(model_type, transformers model, flaxauto model) sharing one tiny checkpoint."""
    model_type = request.param
    reference = torch_model(model_type, "causal-lm")
    directory = tmp_path_factory.mktemp(f"{model_type}-lm")
    reference.save_pretrained(directory)
    return model_type, reference, flaxauto.AutoModelForCausalLM.from_pretrained(directory)


def prompts(model_type):
    """A left-padded batch of 4 prompts (one unpadded)."""
    inputs = text_inputs(model_type, "causal-lm")
    return inputs["input_ids"], inputs["attention_mask"]


def torch_generate(model, ids, mask, **kwargs) -> np.ndarray:
    with torch.no_grad():
        out = model.generate(
            torch.as_tensor(ids), attention_mask=torch.as_tensor(mask), do_sample=False, **kwargs
        )
    return out.numpy()


def test_greedy_is_token_identical_to_transformers(pair):
    model_type, reference, model = pair
    ids, mask = prompts(model_type)
    expected = torch_generate(reference, ids, mask, max_new_tokens=NEW_TOKENS)
    ours = np.asarray(model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS))
    assert expected.shape[1] - ids.shape[1] >= 32, "the reference stopped early; pick a new seed"
    np.testing.assert_array_equal(ours, expected)


@pytest.mark.parametrize("model_type", ["gpt2", "qwen2"])
def test_scanned_layers_generate_like_transformers(model_type, tmp_path):
    """scan_layers stacks the cache [L, B, S, K, D] too; qwen2's tiny config mixes windows."""
    reference = torch_model(model_type, "causal-lm")
    reference.save_pretrained(tmp_path)
    model = flaxauto.AutoModelForCausalLM.from_pretrained(tmp_path, scan_layers=True, remat=True)
    assert model.init_cache(1, 8).keys.shape[0] == reference.config.num_hidden_layers
    unrolled = flaxauto.AutoModelForCausalLM.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="init_cache"):
        model(np.ones((1, 2), np.int32), cache=unrolled.init_cache(1, 8))
    ids, mask = prompts(model_type)
    expected = torch_generate(reference, ids, mask, max_new_tokens=NEW_TOKENS)
    ours = np.asarray(model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS))
    np.testing.assert_array_equal(ours, expected)


def test_eos_stops_every_row_and_pads_finished_ones(pair):
    model_type, reference, model = pair
    ids, mask = prompts(model_type)
    free_run = torch_generate(reference, ids, mask, max_new_tokens=NEW_TOKENS, eos_token_id=None)
    # one eos per row, taken from what each row generates early: rows stop at different steps
    prompt = ids.shape[1]
    eos = sorted({int(free_run[row, prompt + 2 + row]) for row in range(len(ids))})
    settings = dict(max_new_tokens=NEW_TOKENS, eos_token_id=eos, pad_token_id=0)
    expected = torch_generate(reference, ids, mask, **settings)
    ours = np.asarray(model.generate(ids, attention_mask=mask, **settings))
    assert expected.shape[1] < prompt + NEW_TOKENS
    np.testing.assert_array_equal(ours, expected)


@one_family("mistral")
def test_repetition_penalty_and_min_new_tokens_match_transformers(pair):
    model_type, reference, model = pair
    ids, mask = prompts(model_type)
    eos = int(torch_generate(reference, ids, mask, max_new_tokens=3)[0, -1])
    settings = dict(max_new_tokens=24, repetition_penalty=1.5, min_new_tokens=12, eos_token_id=eos)
    expected = torch_generate(reference, ids, mask, **settings)
    ours = np.asarray(model.generate(ids, attention_mask=mask, **settings))
    np.testing.assert_array_equal(ours, expected)


def test_cached_decoding_equals_the_full_forward(pair):
    model_type, _, model = pair
    ids, mask = prompts(model_type)
    split = 5
    full = jax.jit(lambda m, ids, mask: m(ids, attention_mask=mask).logits)(model, ids, mask)
    forward = jax.jit(lambda m, ids, mask, cache: m(ids, attention_mask=mask, cache=cache))
    cache = model.init_cache(len(ids), 16)
    out = forward(model, ids[:, :split], mask[:, :split], cache)
    pieces = [out.logits]
    for t in range(split, ids.shape[1]):  # one token at a time, as a user's own loop would
        out = forward(model, ids[:, t : t + 1], mask[:, t : t + 1], out.cache)
        pieces.append(out.logits)
    assert int(out.cache.length) == ids.shape[1]
    stepped = np.concatenate([np.asarray(p) for p in pieces], axis=1)
    real = mask.astype(bool)[..., None]
    np.testing.assert_allclose(np.where(real, stepped, 0), np.where(real, full, 0), atol=1e-5)


@one_family("gpt2")
def test_cache_rejects_a_whole_sequence_mask_and_overflow(pair):
    model_type, _, model = pair
    ids, mask = prompts(model_type)
    with pytest.raises(ValueError, match="covers only the new tokens"):
        model(ids[:, :1], attention_mask=mask, cache=model.init_cache(len(ids), 16))
    with pytest.raises(ValueError, match="do not fit"):
        model(ids, attention_mask=mask, cache=model.init_cache(len(ids), ids.shape[1] - 1))


@one_family("gpt2")
def test_sampling_is_reproducible_and_top_k_1_is_greedy(pair):
    model_type, _, model = pair
    ids, mask = prompts(model_type)
    greedy = model.generate(ids, attention_mask=mask, max_new_tokens=12)
    top1 = model.generate(
        ids, attention_mask=mask, max_new_tokens=12, do_sample=True, top_k=1, key=jax.random.key(3)
    )
    np.testing.assert_array_equal(np.asarray(top1), np.asarray(greedy))
    settings = dict(max_new_tokens=12, do_sample=True, temperature=1.7, top_k=0, top_p=0.95)
    first = model.generate(ids, attention_mask=mask, key=jax.random.key(7), **settings)
    again = model.generate(ids, attention_mask=mask, key=jax.random.key(7), **settings)
    other = model.generate(ids, attention_mask=mask, key=jax.random.key(8), **settings)
    np.testing.assert_array_equal(np.asarray(first), np.asarray(again))
    assert not np.array_equal(np.asarray(first), np.asarray(other))


def test_warpers_keep_what_transformers_keeps():
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    scores = np.random.default_rng(0).normal(size=(3, 50)).astype(np.float32) * 3
    plan = settings.Plan(True, 0.7, 5, 0.8, 1.0, (), 0)
    expected = torch.as_tensor(scores)
    for warper in (TemperatureLogitsWarper(0.7), TopKLogitsWarper(5), TopPLogitsWarper(0.8)):
        expected = warper(None, expected)
    ours = np.asarray(processors.warp(plan, jnp.asarray(scores)))
    np.testing.assert_array_equal(np.isinf(ours), np.isinf(expected.numpy()))
    finite = ~np.isinf(ours)
    np.testing.assert_allclose(ours[finite], expected.numpy()[finite], rtol=1e-6)


@one_family("qwen2")
def test_other_prompt_lengths_reuse_the_compiled_program(pair):
    model_type, _, model = pair
    ids, mask = prompts(model_type)
    model.generate(ids[:, :6], attention_mask=mask[:, :6], max_new_tokens=5)  # warm: bucket 8
    compiled = greedy.decode._cache_size()
    for length, new in ((5, 5), (7, 5), (8, 6), (6, 8)):  # prompt bucket 8, cache bucket 16
        out = model.generate(ids[:, :length], attention_mask=mask[:, :length], max_new_tokens=new)
        assert out.shape == (len(ids), length + new)
    assert greedy.decode._cache_size() == compiled


@one_family("gpt2")
def test_generate_reads_the_current_weights_and_leaves_the_mode(pair):
    """generate hands the model to its compiled program as a pytree: weights changed in place
    are what the next call decodes with, without a new program; a model in training mode
    (GPT-2's dropout) generates as in eval mode and is still in training mode afterwards."""
    model_type, reference, model = pair
    ids, mask = prompts(model_type)
    before = np.asarray(model.generate(ids, attention_mask=mask, max_new_tokens=8))
    compiled = greedy.decode._cache_size()
    kernel = model.backbone.h[0].mlp.c_fc.kernel
    original = kernel[...]
    try:
        kernel[...] = original * 3.0
        with torch.no_grad():
            reference.transformer.h[0].mlp.c_fc.weight.mul_(3.0)
        expected = torch_generate(reference, ids, mask, max_new_tokens=8)
        ours = np.asarray(model.generate(ids, attention_mask=mask, max_new_tokens=8))
        assert greedy.decode._cache_size() == compiled
        model.train()
        in_training = np.asarray(model.generate(ids, attention_mask=mask, max_new_tokens=8))
        assert model.backbone.h[0].attn.attn_dropout.deterministic is False
    finally:
        kernel[...] = original
        with torch.no_grad():
            reference.transformer.h[0].mlp.c_fc.weight.div_(3.0)
        model.eval()
    assert not np.array_equal(expected, before), "the change moved no token; scale it more"
    np.testing.assert_array_equal(ours, expected)
    np.testing.assert_array_equal(in_training, expected)


def test_generation_config_json_sets_the_defaults(tmp_path):
    reference = torch_model("llama", "causal-lm")
    reference.generation_config = GenerationConfig(
        max_new_tokens=6, eos_token_id=None, pad_token_id=0, repetition_penalty=1.2
    )
    reference.save_pretrained(tmp_path)
    model = flaxauto.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert model.generation_config.max_new_tokens == 6
    ids, mask = prompts("llama")
    with torch.no_grad():
        expected = reference.generate(
            torch.as_tensor(ids), attention_mask=torch.as_tensor(mask)
        ).numpy()
    ours = np.asarray(model.generate(ids, attention_mask=mask))
    assert ours.shape[1] == ids.shape[1] + 6
    np.testing.assert_array_equal(ours, expected)
    model.save_pretrained(tmp_path / "again")  # written back beside the weights
    assert GenerationConfig.from_pretrained(tmp_path / "again").max_new_tokens == 6


@one_family("llama")
def test_bfloat16_weights_are_close_and_generate(pair):
    model_type, reference, _ = pair
    ids, mask = prompts(model_type)
    # transformers' default init scale, for which the 2e-2 bound was set; bf16 accuracy against
    # torch at the conformance scale is test_conformance's bf16 tier
    config = tiny_config(model_type, "causal-lm", initializer_range=0.02)
    fp32 = flaxauto.AutoModelForCausalLM.from_config(config, seed=1)
    bf16 = flaxauto.AutoModelForCausalLM.from_config(
        config, seed=1, param_dtype=jnp.bfloat16
    )  # the same weights, rounded
    real = mask.astype(bool)[..., None]
    forward = jax.jit(lambda m: m(ids, attention_mask=mask).logits.astype(jnp.float32))
    wide, narrow = (np.asarray(forward(m)) for m in (fp32, bf16))
    assert np.abs(np.where(real, wide - narrow, 0)).max() < 2e-2
    out = bf16.generate(ids, attention_mask=mask, max_new_tokens=8)
    assert out.shape == (len(ids), ids.shape[1] + 8)


@one_family("llama")
def test_unsupported_settings_are_named(pair):
    model_type, _, model = pair
    ids, mask = prompts(model_type)
    with pytest.raises(NotImplementedError, match="encoder_no_repeat_ngram_size"):
        model.generate(ids, attention_mask=mask, encoder_no_repeat_ngram_size=2)
    with pytest.raises(TypeError, match="not_a_setting"):
        model.generate(ids, attention_mask=mask, not_a_setting=1)
    with pytest.raises(ValueError, match="max_length"):
        model.generate(ids, attention_mask=mask, max_length=ids.shape[1])


@one_family("gpt2")
def test_generate_needs_a_causal_lm(pair):
    model_type, reference, _ = pair
    base = flaxauto.AutoModel.from_config(reference.config)
    with pytest.raises(TypeError, match="causal LM"):
        base.generate(np.ones((1, 3), np.int32))


def assert_scores_close(ours, theirs):
    """Scores of one step [R, V]: the same tokens banned, the rest within fp32 noise."""
    ours, theirs = np.asarray(ours), theirs.numpy()
    np.testing.assert_array_equal(np.isneginf(ours), np.isneginf(theirs))
    finite = np.isfinite(theirs)
    np.testing.assert_allclose(ours[finite], theirs[finite], rtol=1e-4, atol=1e-4)


@one_family("gpt2")
@pytest.mark.parametrize("sampling", [False, True], ids=["greedy", "sampling"])
def test_return_dict_in_generate_with_scores_as_transformers(pair, sampling):
    """The scores each token was chosen from, after the processors (and, sampling, the
    warpers: top_k=1 keeps transformers' draw deterministic)."""
    model_type, reference, model = pair
    ids, mask = prompts(model_type)
    settings = dict(
        max_new_tokens=12, no_repeat_ngram_size=2, forced_eos_token_id=5, eos_token_id=2,
        return_dict_in_generate=True, output_scores=True, output_logits=True,
    )  # fmt: skip
    if sampling:
        settings.update(do_sample=True, top_k=1, temperature=0.5)
    with torch.no_grad():
        theirs = reference.generate(
            torch.as_tensor(ids), attention_mask=torch.as_tensor(mask), **settings
        )
    ours = model.generate(ids, attention_mask=mask, **settings)
    np.testing.assert_array_equal(np.asarray(ours.sequences), theirs.sequences.numpy())
    assert ours.sequences_scores is None
    assert len(ours.scores) == len(theirs.scores) == theirs.sequences.shape[1] - ids.shape[1]
    for step_ours, step_theirs in zip(ours.scores, theirs.scores, strict=True):
        assert_scores_close(step_ours, step_theirs)
    for step_ours, step_theirs in zip(ours.logits, theirs.logits, strict=True):  # unprocessed
        np.testing.assert_allclose(np.asarray(step_ours), step_theirs.numpy(), atol=1e-4)
    plain = dict(settings, output_scores=False, output_logits=False)
    without = model.generate(ids, attention_mask=mask, **plain)
    assert without.scores is None and without.logits is None
    np.testing.assert_array_equal(np.asarray(without["sequences"]), theirs.sequences.numpy())
    # output_scores alone changes nothing, as in transformers: token ids come back
    alone = dict(settings, return_dict_in_generate=False)
    np.testing.assert_array_equal(
        np.asarray(model.generate(ids, attention_mask=mask, **alone)), theirs.sequences.numpy()
    )


@one_family("llama")
def test_the_decoding_protocol_follows_the_full_forward(pair):
    """start, step and reorder give the logits the whole sequence gives in one forward."""
    model_type, _, model = pair
    ids, mask = prompts(model_type)
    more = np.random.default_rng(0).integers(3, 99, size=(len(ids), 2))
    whole_ids = np.concatenate([ids, more], axis=1)
    whole_mask = np.concatenate([mask, np.ones_like(more)], axis=1)
    positions = np.where(whole_mask == 0, 0, np.cumsum(whole_mask, axis=1) - 1)
    whole = np.asarray(model(whole_ids, attention_mask=whole_mask, position_ids=positions).logits)
    prompt = ids.shape[1]
    state, logits = model.start(ids, mask, cache_length=16)
    np.testing.assert_allclose(np.asarray(logits), whole[:, prompt - 1], atol=1e-5)
    state, logits = model.step(state, jnp.asarray(more[:, 0], jnp.int32))
    np.testing.assert_allclose(np.asarray(logits), whole[:, prompt], atol=1e-5)
    rows = np.array([3, 1, 1, 0, 2])  # beams: rows repeat, the batch grows
    state = model.reorder(state, jnp.asarray(rows))
    state, logits = model.step(state, jnp.asarray(more[rows, 1], jnp.int32))
    np.testing.assert_allclose(np.asarray(logits), whole[rows, prompt + 1], atol=1e-5)


def test_generation_drives_only_the_decoding_protocol():
    """generation/ reads no backbone, head or cache of the model, so an encoder-decoder that
    implements the protocol needs no change there."""
    import ast
    from pathlib import Path

    from flaxauto import generation

    forbidden = {"backbone", "head", "init_cache", "decode_logits", "cache", "keys", "values"}
    for path in Path(generation.__file__).parent.glob("*.py"):
        tree = ast.parse(path.read_text())
        used = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
        assert not used & forbidden, f"{path.name} reads {sorted(used & forbidden)}"
