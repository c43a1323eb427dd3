"""Fine-tune any flaxauto AutoModelFor<Task> on a local CSV or JSONL dataset.

    python examples/finetune.py --model bert-base-uncased --task sequence-classification \\
        --train data/train.jsonl --eval data/dev.jsonl --output out/ \\
        --steps 1000 --batch-size 32 --accumulate 2 --learning-rate 3e-5 --bf16

Each record is either pre-tokenised ("input_ids": [...]) or text ("text" or --text-column,
tokenised with the checkpoint's tokenizer); labels come from --label-column ("label"): a class
index for sequence classification, a list per token for token classification; causal LM trains
on the input ids themselves.

What it does: optax AdamW with linear warm-up and cosine decay (optax.warmup_cosine_decay_schedule),
gradient accumulation (optax.MultiSteps), bf16 compute with fp32 master weights (--bf16:
from_pretrained(dtype=bfloat16, param_dtype=float32)), data parallelism over every device
(a "data" mesh, or --rules fsdp), an eval metric every --eval-every steps (accuracy for
classification, perplexity for causal LM), a tqdm progress bar, orbax checkpoints of model,
optimizer and step every --save-every steps (asynchronous; a rerun with the same --output resumes
from the latest), and save_pretrained into --output at the end (loads in transformers).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

import flaxauto
from flaxauto.registry import TASK_AUTO_CLASSES

TASKS = ("sequence-classification", "token-classification", "causal-lm")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="checkpoint directory or hub id")
    p.add_argument("--task", required=True, choices=TASKS)
    p.add_argument("--train", required=True, help=".csv or .jsonl")
    p.add_argument("--eval", help=".csv or .jsonl (default: no evaluation)")
    p.add_argument("--output", required=True, help="checkpoints/ and the final model go here")
    p.add_argument("--text-column", default="text")
    p.add_argument("--label-column", default="label")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--steps", type=int, default=100, help="optimizer updates")
    p.add_argument("--batch-size", type=int, default=8, help="examples per micro-batch")
    p.add_argument("--accumulate", type=int, default=1, help="micro-batches per update")
    p.add_argument("--learning-rate", type=float, default=5e-5)
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--decay-steps", type=int, help="cosine decay length (default: --steps)")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--bf16", action="store_true", help="bf16 compute, fp32 master weights")
    p.add_argument("--rules", default="data", choices=["data", "fsdp"], help="sharding preset")
    p.add_argument("--eval-every", type=int, default=0, help="0: at the end only")
    p.add_argument("--save-every", type=int, default=0, help="orbax checkpoint interval (0: end)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-labels", type=int, help="sequence/token classification")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


# -- data ---------------------------------------------------------------------------------------


def read_records(path) -> list[dict]:
    path = Path(path)
    if path.suffix == ".csv":
        with path.open(newline="") as f:
            return list(csv.DictReader(f))
    if path.suffix in (".jsonl", ".json"):
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    raise ValueError(f"{path}: a .csv or .jsonl dataset, please")


def _ids(value) -> list[int]:
    return json.loads(value) if isinstance(value, str) else list(value)


def encode(records, args, tokenizer, pad_id: int) -> dict[str, np.ndarray]:
    """Padded (right) arrays [N, T] of input_ids, attention_mask and labels for the task."""
    if "input_ids" in records[0]:
        sequences = [_ids(r["input_ids"])[: args.max_length] for r in records]
    else:
        texts = [r[args.text_column] for r in records]
        sequences = tokenizer(texts, truncation=True, max_length=args.max_length)["input_ids"]
    length = max(len(s) for s in sequences)
    ids = np.full((len(sequences), length), pad_id, np.int32)
    mask = np.zeros((len(sequences), length), np.int32)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)], mask[row, : len(seq)] = seq, 1
    if args.task == "causal-lm":
        labels = np.where(mask == 1, ids, -100)
    elif args.task == "sequence-classification":
        labels = np.asarray([int(r[args.label_column]) for r in records], np.int32)
    else:
        labels = np.full(ids.shape, -100, np.int32)
        for row, r in enumerate(records):
            tags = _ids(r[args.label_column])[:length]
            labels[row, : len(tags)] = tags
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def batches(data, batch_size: int, seed: int, start: int = 0):
    """Micro-batches forever, reshuffled each epoch; resumes at micro-batch `start`."""
    count = len(data["input_ids"])
    per_epoch = count // batch_size
    if per_epoch == 0:
        raise ValueError(f"{count} examples do not fill one batch of {batch_size}")
    index = start
    while True:
        epoch, position = divmod(index, per_epoch)
        order = np.random.default_rng(seed + epoch).permutation(count)
        rows = order[position * batch_size : (position + 1) * batch_size]
        yield {k: v[rows] for k, v in data.items()}
        index += 1


# -- training -----------------------------------------------------------------------------------


def make_optimizer(args):
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, args.learning_rate, max(args.warmup_steps, 1), max(args.decay_steps or args.steps, 2)
    )
    adamw = optax.adamw(schedule, weight_decay=args.weight_decay)
    return optax.MultiSteps(optax.chain(optax.clip_by_global_norm(1.0), adamw), args.accumulate)


def make_train_step(graphdef, optimizer):
    def loss_fn(params, rest, batch):
        model = nnx.merge(graphdef, params, rest, copy=True)
        loss = model(**batch).loss
        return loss, nnx.state(model, nnx.Not(nnx.Param))  # dropout's advanced RNG streams

    def step(params, opt_state, rest, batch):
        (loss, rest), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, rest, batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, rest, loss

    return jax.jit(step, donate_argnums=(0, 1, 2))


def evaluate(model, data, args, mesh) -> dict[str, float]:
    """accuracy (classification) or perplexity (causal LM) and the mean loss over `data`."""
    model.eval()
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda state, batch: nnx.merge(graphdef, state)(**batch))
    losses, correct, counted = [], 0, 0
    for start in range(0, len(data["input_ids"]) - args.batch_size + 1, args.batch_size):
        batch = {k: v[start : start + args.batch_size] for k, v in data.items()}
        out = forward(state, flaxauto.shard_batch(batch, mesh))
        losses.append(float(out.loss))
        if args.task != "causal-lm":
            predicted, labels = np.asarray(out.logits).argmax(-1), batch["labels"]
            keep = labels != -100
            correct += int((predicted == labels)[keep].sum())
            counted += int(keep.sum())
    model.train()
    loss = float(np.mean(losses)) if losses else float("nan")
    metric = {"eval_loss": loss}
    if args.task == "causal-lm":
        metric["perplexity"] = math.exp(min(loss, 50.0))
    else:
        metric["accuracy"] = correct / max(counted, 1)
    return metric


def main(argv=None) -> dict:
    args = parse_args(argv)
    output = Path(args.output)
    mesh = flaxauto.make_mesh(data=-1, fsdp=1) if args.rules == "data" else flaxauto.make_mesh()
    extra = {"num_labels": args.num_labels} if args.num_labels else {}
    precision = {"dtype": jnp.bfloat16, "param_dtype": jnp.float32} if args.bf16 else {}
    auto_class = getattr(flaxauto, TASK_AUTO_CLASSES[args.task])
    model = auto_class.from_pretrained(
        args.model, mesh=mesh, rules=args.rules, **precision, **extra
    )
    model.train()

    tokenizer = None
    train_records = read_records(args.train)
    if "input_ids" not in train_records[0]:
        import transformers

        tokenizer = transformers.AutoTokenizer.from_pretrained(args.model)
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    train = encode(train_records, args, tokenizer, pad)
    evaluation = encode(read_records(args.eval), args, tokenizer, pad) if args.eval else None

    optimizer = make_optimizer(args)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    opt_state = optimizer.init(params)
    checkpoints = flaxauto.TrainingCheckpointer(output / "checkpoints", max_to_keep=2)
    step = 0
    if checkpoints.latest_step() is not None:  # resume: model, optimizer and step
        step, opt_state = checkpoints.restore_with_state(model, opt_state)
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    train_step = make_train_step(graphdef, optimizer)

    history = {"loss": [], "eval": [], "resumed_from": step}
    data = batches(train, args.batch_size, args.seed, start=step * args.accumulate)
    progress = tqdm(total=args.steps, initial=step, disable=args.no_progress, desc="training")
    while step < args.steps:
        micro_losses = []
        for _ in range(args.accumulate):  # MultiSteps applies the update on the last one
            batch = flaxauto.shard_batch(next(data), mesh)
            params, opt_state, rest, loss = train_step(params, opt_state, rest, batch)
            micro_losses.append(loss)
        step += 1
        loss = float(np.mean([float(x) for x in micro_losses]))
        history["loss"].append(loss)
        progress.update(1)
        progress.set_postfix(loss=f"{loss:.4f}")
        nnx.update(model, params, rest)
        if args.save_every and step % args.save_every == 0 and step < args.steps:
            checkpoints.save(step, model, opt_state)
        if evaluation is not None and args.eval_every and step % args.eval_every == 0:
            history["eval"].append({"step": step, **evaluate(model, evaluation, args, mesh)})
    progress.close()
    nnx.update(model, params, rest)
    checkpoints.save(step, model, opt_state, force=True)
    if evaluation is not None:
        history["eval"].append({"step": step, **evaluate(model, evaluation, args, mesh)})
    checkpoints.wait()
    checkpoints.close()
    model.eval()
    model.save_pretrained(output)
    if tokenizer is not None:
        tokenizer.save_pretrained(output)
    (output / "history.json").write_text(json.dumps(history, indent=2))
    return history


if __name__ == "__main__":
    main()
