"""question-answering, which transformers 5 removed: kept with transformers 4.x's behaviour
(its last release that had it): long contexts in overlapping windows (`doc_stride`,
`max_seq_len`), `top_k`, `max_answer_len`, `handle_impossible_answer`, `align_to_words`."""

from __future__ import annotations

import numpy as np

from flaxauto.pipelines.base import Pipeline
from flaxauto.pipelines.text import TextPipeline

#: masks tokens that cannot hold the answer before the softmax, as transformers 4
MASKED_LOGIT = -10000.0


class QuestionAnsweringPipeline(TextPipeline):
    """Call as transformers 4: `qa(question=..., context=...)` (strings, or lists zipped, or
    several questions on one context), `qa({"question", "context"})`, `qa([dicts])` or
    `qa(question, context)`. One question gets {"score", "start", "end", "answer"} (a list of
    them with top_k > 1); several get a list of those."""

    task = "question-answering"
    output_fields = ("start_logits", "end_logits")
    sequence_outputs = ("start_logits", "end_logits")

    def check_params(
        self,
        padding="do_not_pad",
        top_k=1,
        doc_stride=None,
        max_answer_len=15,
        max_seq_len=None,
        max_question_len=64,
        handle_impossible_answer=False,
        align_to_words=True,
    ):
        if not getattr(self.tokenizer, "is_fast", False):
            raise NotImplementedError("question-answering with a slow tokenizer: use a fast one")
        if top_k < 1:
            raise ValueError(f"top_k parameter should be >= 1 (got {top_k})")
        if max_answer_len < 1:
            raise ValueError(f"max_answer_len parameter should be >= 1 (got {max_answer_len})")
        if max_seq_len is None:
            max_seq_len = min(self.tokenizer.model_max_length, 384)
        if doc_stride is None:
            doc_stride = min(max_seq_len // 2, 128)
        if doc_stride > max_seq_len:
            raise ValueError(
                f"`doc_stride` ({doc_stride}) is larger than `max_seq_len` ({max_seq_len})"
            )
        return {
            "padding": padding,
            "top_k": top_k,
            "doc_stride": doc_stride,
            "max_answer_len": max_answer_len,
            "max_seq_len": max_seq_len,
            "max_question_len": max_question_len,
            "handle_impossible_answer": handle_impossible_answer,
            "align_to_words": align_to_words,
        }

    def __call__(self, *args, question=None, context=None, **params):
        examples = _examples(args, question, context)
        if isinstance(examples, list) and len(examples) == 1:
            examples = examples[0]  # transformers 4 answers a list of one as the one
        return Pipeline.__call__(self, examples, **params)

    def is_single(self, inputs) -> bool:
        return isinstance(inputs, dict)

    def preprocess(self, item, padding, doc_stride, max_seq_len, **params):
        question, context = _checked(item)
        question_first = self.tokenizer.padding_side == "right"
        encoded = self.tokenizer(
            text=question if question_first else context,
            text_pair=context if question_first else question,
            padding=padding,
            truncation="only_second" if question_first else "only_first",
            max_length=max_seq_len,
            stride=doc_stride,
            return_token_type_ids=True,
            return_overflowing_tokens=True,
            return_offsets_mapping=True,
            return_special_tokens_mask=True,
        )
        examples = []
        for span in range(len(encoded["input_ids"])):
            inputs = {
                name: np.asarray(encoded[name][span], np.int32)
                for name in ("input_ids", "attention_mask", "token_type_ids")
                if name in encoded
            }
            examples.append(
                self.model_inputs(inputs)
                | {
                    "_p_mask": self._impossible(encoded, span, question_first),
                    "_attention_mask": inputs.get("attention_mask"),
                    "_encoding": encoded.encodings[span],
                    "_input_ids": inputs["input_ids"],
                }
            )
        return examples

    def _impossible(self, encoded, span: int, question_first: bool) -> np.ndarray:
        """1 where a token cannot be part of an answer: all but the context's tokens, except
        the cls token (some models point there for "no answer")."""
        p_mask = np.array(
            [(s != 1) if question_first else 0 for s in encoded.sequence_ids(span)], np.int64
        )
        if self.tokenizer.cls_token_id is not None:
            p_mask[np.asarray(encoded["input_ids"][span]) == self.tokenizer.cls_token_id] = 0
        return p_mask

    def postprocess(
        self, item, outputs, top_k, max_answer_len, handle_impossible_answer, align_to_words,
        **params,
    ):  # fmt: skip
        context = _checked(item)[1]
        question_first = self.tokenizer.padding_side == "right"
        null_score = 1000000.0  # the best "no answer" score seen in any window
        answers = []
        for output in outputs:
            start, end, null = _probabilities(output)
            if handle_impossible_answer:
                null_score = min(null_score, null)
            starts, ends, scores = best_spans(start, end, top_k, max_answer_len, _allowed(output))
            offset = 0
            if self.tokenizer.padding_side == "left":
                offset = int(np.sum(output["_input_ids"] == self.tokenizer.pad_token_id))
            for s, e, score in zip(starts, ends, scores, strict=True):
                first, last = _char_span(
                    output["_encoding"], s - offset, e - offset, 1 if question_first else 0,
                    align_to_words,
                )  # fmt: skip
                answers.append(
                    {
                        "score": float(score),
                        "start": first,
                        "end": last,
                        "answer": context[first:last],
                    }
                )
        if handle_impossible_answer:
            answers.append({"score": null_score, "start": 0, "end": 0, "answer": ""})
        answers = sorted(answers, key=lambda answer: answer["score"], reverse=True)[:top_k]
        return answers[0] if len(answers) == 1 else answers


def _examples(args, question, context):
    """transformers 4's ways of asking -> one {"question", "context"} dict or a list of them."""
    if args:
        if question is not None or context is not None:
            raise ValueError("pass the question and context by position or by name, not both")
        if len(args) == 2 and all(isinstance(a, str) for a in args):
            return [{"question": args[0], "context": args[1]}]
        return args[0] if len(args) == 1 else list(args)
    if question is None or context is None:
        raise ValueError("question-answering needs a question and a context")
    if isinstance(question, list) and isinstance(context, str):
        return [{"question": q, "context": context} for q in question]
    if isinstance(question, list) and isinstance(context, list):
        if len(question) != len(context):
            raise ValueError("Questions and contexts don't have the same lengths")
        return [{"question": q, "context": c} for q, c in zip(question, context, strict=True)]
    if isinstance(question, str) and isinstance(context, str):
        return [{"question": question, "context": context}]
    raise ValueError("Arguments can't be understood")


def _checked(item) -> tuple[str, str]:
    if not isinstance(item, dict) or not {"question", "context"} <= set(item):
        raise KeyError("You need to provide a dictionary with keys {question:..., context:...}")
    for key in ("question", "context"):
        if item[key] is None or item[key] == "":
            raise ValueError(f"`{key}` cannot be {'None' if item[key] is None else 'empty'}")
    return item["question"], item["context"]


def _allowed(output) -> np.ndarray:
    """1 where a token may start or end an answer: a context token the model attended to."""
    allowed = np.abs(output["_p_mask"] - 1)
    if output["_attention_mask"] is not None:
        allowed = allowed & output["_attention_mask"]
    return allowed


def _probabilities(output) -> tuple[np.ndarray, np.ndarray, float]:
    """Start and end probabilities [T] over the allowed tokens (position 0 zeroed after), and
    the "no answer" score: the probability of starting and ending at position 0."""
    masked = _allowed(output) == 0
    start, end = (
        _softmax(np.where(masked, MASKED_LOGIT, np.asarray(output[name], np.float32)))
        for name in ("start_logits", "end_logits")
    )
    null = float(start[0] * end[0])
    start[0] = end[0] = 0.0
    return start, end, null


def _softmax(x: np.ndarray) -> np.ndarray:
    x = np.exp(x - x.max(axis=-1, keepdims=True))
    return x / x.sum()


def best_spans(start, end, top_k: int, max_answer_len: int, allowed: np.ndarray):
    """The top_k spans by start x end probability with start <= end < start + max_answer_len,
    then those whose ends are both allowed (as transformers 4: filtered after ranking)."""
    candidates = np.tril(np.triu(np.outer(start, end)), max_answer_len - 1)  # [T, T]
    flat = candidates.flatten()
    if top_k == 1:
        order = np.array([np.argmax(flat)])
    elif len(flat) < top_k:
        order = np.argsort(-flat)
    else:
        order = np.argpartition(-flat, top_k)[:top_k]
        order = order[np.argsort(-flat[order])]
    starts, ends = np.unravel_index(order, candidates.shape)
    keep = np.isin(starts, allowed.nonzero()) & np.isin(ends, allowed.nonzero())
    starts, ends = starts[keep], ends[keep]
    return starts, ends, candidates[starts, ends]


def _char_span(encoding, start: int, end: int, sequence: int, align_to_words: bool):
    """Token span -> character span in the context, widened to whole words when asked (and
    the tokenizer knows words)."""
    if align_to_words:
        try:
            first = encoding.word_to_chars(encoding.token_to_word(start), sequence_index=sequence)
            last = encoding.word_to_chars(encoding.token_to_word(end), sequence_index=sequence)
            return first[0], last[1]
        except Exception:  # tokenizers without words: keep to the token offsets
            pass
    return encoding.offsets[start][0], encoding.offsets[end][1]
