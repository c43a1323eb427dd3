"""Text pipelines over transformers' tokenizers: the same call signatures and answers as
transformers' text-classification, feature-extraction, fill-mask and token-classification."""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from flaxauto import inputs as declared_inputs
from flaxauto.pipelines.base import Pipeline


def softmax(x: np.ndarray) -> np.ndarray:
    shifted = np.exp(x - np.max(x, axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


SCORE_FUNCTIONS = {"softmax": softmax, "sigmoid": sigmoid, "none": lambda x: x}


class TextPipeline(Pipeline):
    """Tokenizes each input alone (numpy arrays, one example per input)."""

    sorts_by_length = True

    def tokenize(self, text, **kwargs) -> dict[str, np.ndarray]:
        """transformers' tokenizer on one input -> the example (arrays without batch axis)."""
        if isinstance(text, dict):
            encoded = self.tokenizer(**text, return_tensors="np", **kwargs)
        else:
            encoded = self.tokenizer(text, return_tensors="np", **kwargs)
        return {name: value[0] for name, value in encoded.items()}

    def model_inputs(self, encoded: dict) -> dict:
        """The tokenizer's outputs the model declares (drops e.g. token_type_ids for GPT-2)."""
        accepted = declared_inputs.backbone_inputs(type(self.model.backbone)).data
        return {k: v for k, v in encoded.items() if k in accepted or k.startswith("_")}


class TextClassificationPipeline(TextPipeline):
    """text-classification (alias sentiment-analysis): `top_k` and `function_to_apply` as in
    transformers. Without top_k a string gets `[{"label", "score"}]` (its best label), a list
    one such dict per text; with top_k each text gets a list of its top_k labels (None: all)."""

    task = "sequence-classification"

    TOKENIZER_OPTIONS: ClassVar[set[str]] = {"truncation", "max_length", "add_special_tokens"}

    def check_params(self, top_k="unset", function_to_apply=None, **tokenizer_kwargs):
        unknown = sorted(set(tokenizer_kwargs) - self.TOKENIZER_OPTIONS)
        if unknown:
            raise TypeError(f"text-classification got unexpected parameters {unknown}")
        params = {"top_k": top_k, "tokenizer_kwargs": tokenizer_kwargs}
        if function_to_apply is not None:
            name = str(getattr(function_to_apply, "value", function_to_apply)).lower()
            if name not in SCORE_FUNCTIONS:
                raise ValueError(
                    f"function_to_apply={function_to_apply!r}: use one of {sorted(SCORE_FUNCTIONS)}"
                )
            params["function_to_apply"] = name
        if top_k != "unset" and top_k is not None and (not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"top_k must be a positive integer or None, not {top_k!r}")
        return params

    def __call__(self, inputs, **params):
        answers = super().__call__(inputs, **params)
        legacy = (self.options | params).get("top_k", "unset") == "unset"
        # transformers answers a lone string with a one-element list
        return [answers] if legacy and isinstance(inputs, str) else answers

    def preprocess(self, item, tokenizer_kwargs, **params):
        if isinstance(item, list):
            raise ValueError(
                'to classify a text pair, pass a dict {"text": ..., "text_pair": ...}, not a list'
            )
        return [self.model_inputs(self.tokenize(item, **tokenizer_kwargs))]

    def default_function(self) -> str:
        problem_type, num_labels = self.config.problem_type, self.config.num_labels
        if problem_type == "regression":
            return "none"
        if problem_type == "multi_label_classification" or num_labels == 1:
            return "sigmoid"
        return "softmax"

    def postprocess(self, item, outputs, top_k="unset", function_to_apply=None, **params):
        function = function_to_apply or self.default_function()
        scores = SCORE_FUNCTIONS[function](np.asarray(outputs[0]["logits"], np.float32))
        labels = self.config.id2label
        if top_k == "unset":
            best = int(scores.argmax())
            return {"label": labels[best], "score": float(scores[best])}
        ranked = sorted(
            ({"label": labels[i], "score": float(s)} for i, s in enumerate(scores)),
            key=lambda answer: answer["score"],
            reverse=True,
        )
        return ranked if top_k is None else ranked[:top_k]


class FeatureExtractionPipeline(TextPipeline):
    """feature-extraction: the backbone's last hidden state [1, T, H] per text, as nested lists
    (or a numpy array with return_tensors=True)."""

    task = "base"
    output_fields = ("last_hidden_state",)
    sequence_outputs = ("last_hidden_state",)

    def check_params(self, truncation=None, tokenize_kwargs=None, return_tensors=False):
        tokenize_kwargs = dict(tokenize_kwargs or {})
        if truncation is not None:
            if "truncation" in tokenize_kwargs:
                raise ValueError("truncation given twice (as a keyword and in tokenize_kwargs)")
            tokenize_kwargs["truncation"] = truncation
        return {"tokenize_kwargs": tokenize_kwargs, "return_tensors": return_tensors}

    def preprocess(self, item, tokenize_kwargs, **params):
        return [self.model_inputs(self.tokenize(item, **tokenize_kwargs))]

    def postprocess(self, item, outputs, return_tensors=False, **params):
        hidden = np.asarray(outputs[0]["last_hidden_state"])[None]  # [1, T, H]
        return hidden if return_tensors else hidden.tolist()


class FillMaskPipeline(TextPipeline):
    """fill-mask: for each mask token, the `top_k` (default 5) tokens that fill it, optionally
    among `targets` only: dicts with score, token, token_str and sequence."""

    task = "masked-lm"
    sequence_outputs = ("logits",)

    def check_params(self, top_k=None, targets=None, tokenizer_kwargs=None):
        if self.tokenizer.mask_token_id is None:
            raise ValueError("fill-mask needs a tokenizer that defines a mask token")
        params = {"tokenizer_kwargs": dict(tokenizer_kwargs or {})}
        if top_k is not None:
            params["top_k"] = top_k
        if targets is not None:
            params["target_ids"] = self.target_ids(targets)
        return params

    def __call__(self, inputs, **params):
        answers = super().__call__(inputs, **params)
        # as transformers: a list holding one text is answered like the text alone
        return answers[0] if isinstance(inputs, list) and len(inputs) == 1 else answers

    def target_ids(self, targets) -> np.ndarray:
        """Each target's vocabulary id; a word outside the vocabulary stands for its first
        token, as in transformers (duplicates dropped in the same order)."""
        vocab = self.tokenizer.get_vocab()
        ids = []
        for target in [targets] if isinstance(targets, str) else targets:
            if target in vocab:
                ids.append(vocab[target])
                continue
            tokens = self.tokenizer(
                target,
                add_special_tokens=False,
                return_attention_mask=False,
                return_token_type_ids=False,
                max_length=1,
                truncation=True,
            )["input_ids"]
            ids += tokens[:1]
        ids = list(set(ids))
        if not ids:
            raise ValueError("At least one target must be provided when passed.")
        return np.array(ids)

    def preprocess(self, item, tokenizer_kwargs, **params):
        example = self.model_inputs(self.tokenize(item, **tokenizer_kwargs))
        if not np.any(example["input_ids"] == self.tokenizer.mask_token_id):
            raise ValueError(f"No mask_token ({self.tokenizer.mask_token}) found on the input")
        return [example | {"_input_ids": example["input_ids"]}]

    def postprocess(self, item, outputs, top_k=5, target_ids=None, **params):
        input_ids = outputs[0]["_input_ids"]
        masked = np.nonzero(input_ids == self.tokenizer.mask_token_id)[0]
        probs = softmax(np.asarray(outputs[0]["logits"], np.float32)[masked])  # [M, V]
        if target_ids is not None:
            probs = probs[:, target_ids]
            top_k = min(top_k, len(target_ids))
        single_mask = len(masked) == 1
        answers = []
        for position, row in zip(masked, probs, strict=True):
            best = np.argsort(-row, kind="stable")[:top_k]
            answers.append(
                [
                    self._proposal(input_ids, position, token, float(row[index]), single_mask)
                    for index, token in zip(
                        best, best if target_ids is None else target_ids[best], strict=True
                    )
                ]
            )
        return answers[0] if single_mask else answers

    def _proposal(self, input_ids, position, token, score, single_mask) -> dict:
        tokens = input_ids.copy()
        tokens[position] = token
        tokens = tokens[tokens != self.tokenizer.pad_token_id]
        sequence = self.tokenizer.decode(tokens, skip_special_tokens=single_mask)
        token = int(token)
        return {
            "score": score,
            "token": token,
            "token_str": self.tokenizer.decode([token]),
            "sequence": sequence,
        }


class TokenClassificationPipeline(TextPipeline):
    """token-classification (alias ner): per-token entities, or with `aggregation_strategy`
    ("simple", "first", "average", "max") entity groups over words, as transformers computes
    them; `ignore_labels` (default ["O"]); long texts in overlapping windows with `stride`."""

    task = "token-classification"
    sequence_outputs = ("logits",)
    STRATEGIES: ClassVar[tuple[str, ...]] = ("none", "simple", "first", "average", "max")

    def check_params(self, ignore_labels=None, aggregation_strategy=None, stride=None):
        strategy = str(getattr(aggregation_strategy, "value", aggregation_strategy or "none"))
        strategy = strategy.lower()
        if strategy not in self.STRATEGIES:
            raise ValueError(
                f"aggregation_strategy={aggregation_strategy!r}: use {self.STRATEGIES}"
            )
        fast = getattr(self.tokenizer, "is_fast", False)
        if strategy in ("first", "average", "max") and not fast:
            raise ValueError(
                f"aggregation_strategy={strategy!r} needs a fast tokenizer (word boundaries)"
            )
        if stride is not None:
            if strategy == "none":
                raise ValueError("stride needs an aggregation_strategy other than 'none'")
            if not fast:
                raise ValueError("stride needs a fast tokenizer")
            if stride >= self.tokenizer.model_max_length:
                raise ValueError("stride must be less than tokenizer.model_max_length")
        return {
            "ignore_labels": ["O"] if ignore_labels is None else ignore_labels,
            "strategy": strategy,
            "stride": stride,
        }

    def preprocess(self, item, stride=None, **params):
        if not isinstance(item, str):
            raise ValueError("token-classification reads untokenized strings")
        options = dict(
            return_tensors="np",
            truncation=bool(self.tokenizer.model_max_length),
            return_special_tokens_mask=True,
            return_offsets_mapping=self.tokenizer.is_fast,
        )
        if stride is not None:
            options.update(return_overflowing_tokens=True, padding=True, stride=stride)
        encoded = self.tokenizer(item, **options)
        encoded.pop("overflow_to_sample_mapping", None)
        private = {"special_tokens_mask", "offset_mapping"}
        return [
            self.model_inputs({k: v[i] for k, v in encoded.items() if k not in private})
            | {"_" + k: encoded[k][i] for k in private if k in encoded}
            | {"_input_ids": encoded["input_ids"][i]}
            for i in range(len(encoded["input_ids"]))
        ]

    def postprocess(self, item, outputs, ignore_labels, strategy, **params):
        entities = []
        for chunk in outputs:
            scores = softmax(np.asarray(chunk["logits"], np.float32))  # [T, L]
            tokens = self._tokens(item, chunk, scores, strategy)
            for entity in self._aggregate(tokens, strategy):
                label = entity.get("entity", entity.get("entity_group"))
                if label not in ignore_labels:
                    entities.append(entity)
        return _resolve_overlaps(entities) if len(outputs) > 1 else entities

    def _tokens(self, sentence, chunk, scores, strategy) -> list[dict]:
        """Each non-special token: its word piece, scores, character span, index, and whether
        it continues the previous word."""
        input_ids, offsets = chunk["_input_ids"], chunk.get("_offset_mapping")
        tokenizer = self.tokenizer
        subword_prefix = getattr(getattr(tokenizer, "_tokenizer", None), "model", None)
        has_prefix = bool(getattr(subword_prefix, "continuing_subword_prefix", None))
        tokens = []
        for index, token_scores in enumerate(scores):
            if chunk["_special_tokens_mask"][index]:
                continue
            word = tokenizer.convert_ids_to_tokens(int(input_ids[index]))
            start = end = None
            is_subword = False
            if offsets is not None:
                start, end = (int(v) for v in offsets[index])
                piece = sentence[start:end]
                if has_prefix:
                    is_subword = len(word) != len(piece)
                else:  # transformers' heuristic: no space before the piece
                    is_subword = start > 0 and " " not in sentence[start - 1 : start + 1]
                if int(input_ids[index]) == tokenizer.unk_token_id:
                    word, is_subword = piece, False
            tokens.append(
                {"word": word, "scores": token_scores, "start": start, "end": end}
                | {"index": index, "is_subword": is_subword}
            )
        return tokens

    def _aggregate(self, tokens, strategy) -> list[dict]:
        labels = self.config.id2label
        if strategy in ("none", "simple"):
            entities = [
                {
                    "entity": labels[int(t["scores"].argmax())],
                    "score": t["scores"].max(),
                    "index": t["index"],
                    "word": t["word"],
                    "start": t["start"],
                    "end": t["end"],
                }
                for t in tokens
            ]
            if strategy == "none":
                return entities
        else:
            entities = [self._word_entity(word, strategy) for word in _words(tokens)]
        return [self._group(group) for group in _entity_groups(entities)]

    def _word_entity(self, pieces, strategy) -> dict:
        """One word's entity from its pieces: the first piece's, the most confident piece's, or
        the mean of their scores."""
        if strategy == "first":
            scores = pieces[0]["scores"]
        elif strategy == "max":
            scores = max(pieces, key=lambda piece: piece["scores"].max())["scores"]
        else:
            scores = np.nanmean(np.stack([piece["scores"] for piece in pieces]), axis=0)
        best = int(scores.argmax())
        return {
            "entity": self.config.id2label[best],
            "score": scores[best],
            "word": self.tokenizer.convert_tokens_to_string([p["word"] for p in pieces]),
            "start": pieces[0]["start"],
            "end": pieces[-1]["end"],
        }

    def _group(self, entities) -> dict:
        return {
            "entity_group": _tag(entities[0]["entity"])[1],
            "score": np.mean(np.nanmean([e["score"] for e in entities])),
            "word": self.tokenizer.convert_tokens_to_string([e["word"] for e in entities]),
            "start": entities[0]["start"],
            "end": entities[-1]["end"],
        }


def _words(tokens: list[dict]) -> list[list[dict]]:
    words: list[list[dict]] = []
    for token in tokens:
        if words and token["is_subword"]:
            words[-1].append(token)
        else:
            words.append([token])
    return words


def _tag(label: str) -> tuple[str, str]:
    """BIO label -> (B or I, entity type); a label without prefix counts as I."""
    if label.startswith(("B-", "I-")):
        return label[0], label[2:]
    return "I", label


def _entity_groups(entities: list[dict]) -> list[list[dict]]:
    """Adjacent entities of one type join a group unless the later one begins (B-) another."""
    groups: list[list[dict]] = []
    for entity in entities:
        begins, kind = _tag(entity["entity"])
        if groups and kind == _tag(groups[-1][-1]["entity"])[1] and begins != "B":
            groups[-1].append(entity)
        else:
            groups.append([entity])
    return groups


def _resolve_overlaps(entities: list[dict]) -> list[dict]:
    """Entities found in overlapping windows: of those that overlap, the longest (then the
    most confident) stays, as transformers resolves them."""
    if not entities:
        return entities
    entities = sorted(entities, key=lambda e: e["start"])
    kept, current = [], entities[0]
    for entity in entities:
        if current["start"] <= entity["start"] < current["end"]:
            length, current_length = (
                entity["end"] - entity["start"],
                current["end"] - current["start"],
            )
            if length > current_length or (
                length == current_length and entity["score"] > current["score"]
            ):
                current = entity
        else:
            kept.append(current)
            current = entity
    kept.append(current)
    return kept


class ZeroShotClassificationPipeline(TextPipeline):
    """zero-shot-classification over an NLI sequence classifier: each candidate label becomes
    the hypothesis "This example is {label}." against the text; answers
    {"sequence", "labels", "scores"} ranked, scores over the candidates (softmax of entailment)
    or, with multi_label=True, each label's entailment against contradiction."""

    task = "sequence-classification"

    def check_params(
        self, candidate_labels=None, hypothesis_template="This example is {}.", multi_label=False
    ):
        if isinstance(candidate_labels, str):
            candidate_labels = [label.strip() for label in candidate_labels.split(",")]
            candidate_labels = [label for label in candidate_labels if label]
        return {
            "candidate_labels": candidate_labels,
            "hypothesis_template": hypothesis_template,
            "multi_label": multi_label,
        }

    def __call__(self, inputs, *args, **params):
        if args:  # transformers takes the candidate labels second, by position
            if len(args) > 1 or "candidate_labels" in params:
                raise ValueError(f"Unable to understand extra arguments {args}")
            params["candidate_labels"] = args[0]
        return super().__call__(inputs, **params)

    def entailment_id(self) -> int:
        for label, index in self.config.label2id.items():
            if label.lower().startswith("entail"):
                return index
        return -1

    def preprocess(self, item, candidate_labels, hypothesis_template, **params):
        if not candidate_labels or not item:
            raise ValueError("You must include at least one label and at least one sequence.")
        if hypothesis_template.format(candidate_labels[0]) == hypothesis_template:
            raise ValueError(
                f"hypothesis_template {hypothesis_template!r} has no {{}} for the label to go in"
            )
        return [
            self.model_inputs(
                self.tokenize(
                    {"text": item, "text_pair": hypothesis_template.format(label)},
                    truncation="only_first",
                )
            )
            for label in candidate_labels
        ]

    def postprocess(self, item, outputs, candidate_labels, multi_label, **params):
        logits = np.stack([np.asarray(o["logits"], np.float32) for o in outputs])  # [n, classes]
        entail = self.entailment_id()
        if multi_label or len(candidate_labels) == 1:
            contradiction = -1 if entail == 0 else 0
            scores = softmax(logits[:, [contradiction, entail]])[:, 1]
        else:
            scores = softmax(logits[:, entail])
        ranked = list(reversed(scores.argsort()))
        return {
            "sequence": item,
            "labels": [candidate_labels[i] for i in ranked],
            "scores": scores[ranked].tolist(),
        }
