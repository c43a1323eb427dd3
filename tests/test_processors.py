"""The logits processors hub generation configs set, against transformers' own LogitsProcessor
classes on random scores and token histories, and generate() with each setting against
transformers' generate on tiny random decoders (greedy, sampling and beam search)."""

from __future__ import annotations

from collections import Counter

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.generation import logits_process as hf

import flaxauto
from flaxauto.generation import processors, settings
from references import text_inputs, torch_model

ROWS, LENGTH, VOCAB = 5, 14, 23
#: columns of bucket padding before each history and of leftover tokens after it: the
#: processors must read neither (both hold tokens that would otherwise match)
BEFORE, AFTER = 3, 6


def histories(seed: int = 0):
    """A transformers history [R, T] from few distinct tokens (n-grams recur), random scores
    [R, V] with a few -inf, and the history in a flaxauto token buffer (first, end)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 4, size=(ROWS, LENGTH))
    ids[1, -3:] = [0, 1, 2]  # row 1 ends with a bad word's prefix below
    scores = rng.normal(size=(ROWS, VOCAB)).astype(np.float32) * 3
    scores[0, 5] = -np.inf
    buffer = np.concatenate(
        [
            np.tile(ids[:, -BEFORE:], 1),  # the history's own tail: would match if read
            ids,
            np.tile(ids[:, :AFTER], 1),
        ],
        axis=1,
    )
    return ids, scores, jnp.asarray(buffer, jnp.int32), BEFORE, BEFORE + LENGTH


def expected(processor, ids, scores) -> np.ndarray:
    return processor(torch.as_tensor(ids), torch.as_tensor(scores)).numpy()


def assert_same_scores(ours, theirs):
    ours = np.asarray(ours)
    np.testing.assert_array_equal(np.isneginf(ours), np.isneginf(theirs))
    finite = np.isfinite(theirs)
    np.testing.assert_array_equal(ours[finite], theirs[finite])


@pytest.mark.parametrize("size", [1, 2, 3, LENGTH, LENGTH + 1, BEFORE + LENGTH + AFTER + 1])
def test_no_repeat_ngram_bans_what_transformers_bans(size):
    ids, scores, buffer, first, end = histories()
    ours = processors.no_repeat_ngram(jnp.asarray(scores), buffer, first, end, size)
    theirs = expected(hf.NoRepeatNGramLogitsProcessor(size), ids, scores)
    assert_same_scores(ours, theirs)
    if size <= 3:
        assert np.isneginf(theirs).sum() > np.isneginf(scores).sum() + 1, (
            "nothing banned: the test would not notice"
        )


def test_bad_words_ban_what_transformers_bans():
    ids, scores, buffer, first, end = histories()
    eos = [7, 9]
    bad = [
        [4],  # one token: always
        [7],  # a lone eos: never banned
        [7, 11],  # eos inside a longer sequence still counts
        [0, 1, 2, 12],  # row 1 ends with 0 1 2
        [int(ids[3, -1]), 13],  # row 3 ends with its first token
        [int(ids[3, -1]), 13],  # a duplicate
        [*ids[2, :].tolist(), 14],  # as long as the history: matches row 2 only
        [*ids[2, -BEFORE:].tolist(), *ids[2].tolist(), 15],  # longer: would match the buffer
    ]
    sequences = settings.bad_word_sequences(bad, eos)
    ours = processors.bad_words(jnp.asarray(scores), buffer, first, end, sequences)
    theirs = expected(hf.NoBadWordsLogitsProcessor(bad, eos_token_id=eos), ids, scores)
    assert_same_scores(ours, theirs)
    assert np.isneginf(theirs[:, 4]).all() and not np.isneginf(theirs[:, 7]).any()
    assert np.isneginf(theirs[1, 12]) and np.isneginf(theirs[2, 14])
    assert not np.isneginf(theirs[2, 15]) and not np.isneginf(theirs[0, 12])


@pytest.mark.parametrize(
    "bad, message",
    [([], "non-empty list"), ([[1], 2], "list of non-empty lists"), ([[]], "non-empty lists"),
     ([[1, -2]], "positive integers")],
)  # fmt: skip
def test_bad_words_ids_are_checked_as_transformers_checks_them(bad, message):
    with pytest.raises(ValueError, match=message):
        settings.bad_word_sequences(bad, ())


def test_bad_words_outside_the_vocabulary_are_refused():
    ids, scores, buffer, first, end = histories()
    with pytest.raises(ValueError, match="bad_words_ids.*23 tokens"):
        processors.bad_words(jnp.asarray(scores), buffer, first, end, ((3, VOCAB),))


@pytest.mark.parametrize("length", [1, 2])
def test_forced_bos_as_transformers(length):
    ids, scores, buffer, _, end = histories()
    ids = ids[:, -length:]
    ours = processors.forced_bos(jnp.asarray(scores), jnp.asarray(length), 6)
    assert_same_scores(ours, expected(hf.ForcedBOSTokenLogitsProcessor(6), ids, scores))


@pytest.mark.parametrize("max_length", [LENGTH + 1, LENGTH + 2])
@pytest.mark.parametrize("eos", [3, [3, 8]])
def test_forced_eos_as_transformers(max_length, eos):
    ids, scores, *_ = histories()
    ours = processors.forced_eos(
        jnp.asarray(scores), jnp.asarray(LENGTH), jnp.asarray(max_length), np.atleast_1d(eos)
    )
    theirs = expected(hf.ForcedEOSTokenLogitsProcessor(max_length, eos), ids, scores)
    assert_same_scores(ours, theirs)


def test_suppress_tokens_as_transformers():
    ids, scores, *_ = histories()
    tokens = [0, 5, 17]
    ours = processors.suppress(jnp.asarray(scores), tokens)
    assert_same_scores(ours, expected(hf.SuppressTokensLogitsProcessor(tokens), ids, scores))


@pytest.mark.parametrize("begin", [LENGTH - 1, LENGTH])
def test_begin_suppress_tokens_as_transformers(begin):
    ids, scores, *_ = histories()
    tokens = [1, 5]
    ours = processors.suppress_at_begin(jnp.asarray(scores), jnp.asarray(LENGTH), begin, tokens)
    theirs = expected(hf.SuppressTokensAtBeginLogitsProcessor(tokens, begin), ids, scores)
    assert_same_scores(ours, theirs)


@pytest.mark.parametrize("minimum", [LENGTH, LENGTH + 1])
def test_min_length_as_transformers(minimum):
    ids, scores, *_ = histories()
    ours = processors.min_length(jnp.asarray(scores), jnp.asarray(LENGTH), minimum, (2, 4))
    theirs = expected(hf.MinLengthLogitsProcessor(minimum, [2, 4]), ids, scores)
    assert_same_scores(ours, theirs)


# generate() with each setting, token-identical to transformers' generate

NEW_TOKENS = 16


@pytest.fixture(scope="module", params=("gpt2", "llama"))
def pair(request, tmp_path_factory):
    """(transformers model, flaxauto model, prompt ids, mask, a free run without eos)."""
    model_type = request.param
    # a larger init scale than the default: tokens vary, so each setting has something to change
    reference = torch_model(model_type, "causal-lm", initializer_range=0.5)
    directory = tmp_path_factory.mktemp(f"{model_type}-processors")
    reference.save_pretrained(directory)
    inputs = text_inputs(model_type, "causal-lm")
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    free = torch_generate(reference, ids, mask, max_new_tokens=NEW_TOKENS, eos_token_id=None)
    model = flaxauto.AutoModelForCausalLM.from_pretrained(directory)
    return reference, model, ids, mask, free[:, ids.shape[1] :]


def torch_generate(model, ids, mask, **settings) -> np.ndarray:
    settings.setdefault("do_sample", False)
    with torch.no_grad():
        out = model.generate(torch.as_tensor(ids), attention_mask=torch.as_tensor(mask), **settings)
    return out.numpy()


def one_family(model_type: str):
    return pytest.mark.parametrize("pair", [model_type], indirect=True)


def settings_for(name: str, generated: np.ndarray) -> dict:
    """A value of each setting that changes what this model generates, taken from its free run."""
    common = Counter(generated.ravel().tolist()).most_common()
    if name == "no_repeat_ngram_size":  # pairs where the free run repeats one, else tokens
        pairs = [list(zip(row[:-1], row[1:], strict=True)) for row in generated.tolist()]
        repeats = any(len(set(row)) < len(row) for row in pairs)
        return dict(no_repeat_ngram_size=2 if repeats else 1)
    if name == "bad_words_ids":
        # one token, and a pair the free run produces in row 1
        return dict(bad_words_ids=[[common[0][0]], generated[1, 3:5].tolist()])
    if name == "suppress_tokens":
        return dict(suppress_tokens=[token for token, _ in common[:2]])
    if name == "begin_suppress_tokens":
        return dict(begin_suppress_tokens=sorted(set(generated[:, 0].tolist())))
    if name == "forced_eos_token_id":
        return dict(forced_eos_token_id=[common[-1][0], 50])
    raise AssertionError(name)


SETTINGS = (
    "no_repeat_ngram_size",
    "bad_words_ids",
    "suppress_tokens",
    "begin_suppress_tokens",
    "forced_eos_token_id",
)


@pytest.mark.parametrize("name", SETTINGS)
def test_each_setting_generates_as_transformers(pair, name):
    reference, model, ids, mask, free = pair
    setting = dict(settings_for(name, free), max_new_tokens=NEW_TOKENS, eos_token_id=None)
    theirs = torch_generate(reference, ids, mask, **setting)
    assert not np.array_equal(theirs[:, ids.shape[1] :], free), f"{name} changed nothing"
    ours = np.asarray(model.generate(ids, attention_mask=mask, **setting))
    np.testing.assert_array_equal(ours, theirs)


@one_family("llama")
def test_forced_bos_after_a_one_token_prompt(pair):
    reference, model, ids, mask, _ = pair
    first = ids[:, -1:]  # every row's last prompt token alone
    setting = dict(
        forced_bos_token_id=7, begin_suppress_tokens=[7, 3], max_new_tokens=6, eos_token_id=None
    )
    theirs = torch_generate(reference, first, np.ones_like(first), **setting)
    assert (theirs[:, 1] == 7).all()
    ours = model.generate(first, attention_mask=np.ones_like(first), **setting)
    np.testing.assert_array_equal(np.asarray(ours), theirs)


def all_settings(free: np.ndarray) -> dict:
    combined = {}
    for name in SETTINGS:
        combined.update(settings_for(name, free))
    return combined


@one_family("gpt2")
def test_every_setting_at_once_when_sampling(pair):
    """Sampling runs the processors too; top_k=1 makes transformers' draw deterministic."""
    reference, model, ids, mask, free = pair
    setting = dict(all_settings(free), max_new_tokens=NEW_TOKENS, eos_token_id=2)
    sampled = dict(setting, do_sample=True, top_k=1, temperature=0.7)
    # one forced eos: two would tie at the last step, and transformers draws between them
    sampled["forced_eos_token_id"] = setting["forced_eos_token_id"][0]
    theirs = torch_generate(reference, ids, mask, **sampled)
    assert not np.array_equal(theirs, torch_generate(reference, ids, mask, max_new_tokens=16))
    ours = model.generate(ids, attention_mask=mask, **sampled)
    np.testing.assert_array_equal(np.asarray(ours), theirs)


@pytest.mark.parametrize("name", ["no_repeat_ngram_size", "all"])
def test_beam_search_with_the_settings(pair, name):
    """The processors are the greedy ones; what beam search adds is the history they read (each
    beam's tokens, reordered with the beams): the n-gram ban reads most of it."""
    reference, model, ids, mask, free = pair
    setting = all_settings(free) if name == "all" else settings_for(name, free)
    setting = dict(setting, num_beams=3, max_new_tokens=NEW_TOKENS, eos_token_id=2)
    theirs = torch_generate(reference, ids, mask, **setting)
    plain = {k: v for k, v in setting.items() if k not in (*SETTINGS, "all")}
    assert not np.array_equal(theirs, torch_generate(reference, ids, mask, **plain))
    ours = model.generate(ids, attention_mask=mask, **setting)
    np.testing.assert_array_equal(np.asarray(ours), theirs)
