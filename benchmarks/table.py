"""Table question answering: a TAPAS WTQ-shaped model (2 layers of TAPAS-base width), batch 8 x
seq 128 over a 6 x 8 table (header included), flaxauto under jit vs transformers PyTorch on the
same weights.

Two rows: the forward (cell and aggregation logits, the head's segment reductions included) and
the weakly supervised loss with its gradients (aggregation from the answer, the Huber answer
loss), both as fine-tuning on WTQ runs them. flaxauto jits a pure function over nnx.split state;
PyTorch runs eagerly with as many threads as JAX has cores.

    python benchmarks/table.py [--quick]
"""

from __future__ import annotations

import os
import tempfile

import common
import jax
import numpy as np

BATCH, LENGTH, ROWS, COLUMNS, QUESTION = 8, 128, 5, 8, 12
WTQ = dict(
    num_hidden_layers=2, num_aggregation_labels=4, use_answer_as_supervision=True,
    answer_loss_cutoff=0.664694, cell_selection_preference=0.207951, huber_loss_delta=0.121194,
    init_cell_selection_weights_to_zero=False, select_one_column=True,
    allow_empty_column_selection=False, temperature=0.0352513, hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
)  # fmt: skip


def table_batch(rng) -> dict[str, np.ndarray]:
    """[CLS] question [SEP] then the table row by row, two tokens per cell; labels in one column."""
    types = np.zeros((BATCH, LENGTH, 7), np.int64)
    start = QUESTION + 2
    cells = (ROWS + 1) * COLUMNS
    tokens = np.arange(2 * cells) // 2  # two tokens per cell
    rows, columns = tokens // COLUMNS, tokens % COLUMNS + 1
    end = start + 2 * cells
    types[:, start:end, 0] = 1
    types[:, start:end, 1] = columns
    types[:, start:end, 2] = rows
    types[:, start:end, 4] = np.where(rows > 0, rows, 0)
    labels = np.zeros((BATCH, LENGTH), np.int64)
    labels[:, start:end] = (columns == 3) & (rows % 2 == 1)
    numeric = np.full((BATCH, LENGTH), np.nan, np.float32)
    numeric[:, start:end] = np.where(rows > 0, rows * 3.0, np.nan)
    answers = rng.uniform(0, 30, BATCH).astype(np.float32)
    answers[::2] = np.nan
    inputs = {
        "input_ids": rng.integers(5, 30000, (BATCH, LENGTH)),
        "attention_mask": np.ones((BATCH, LENGTH), np.int64),
        "token_type_ids": types,
    }
    labels = {
        "labels": labels, "float_answer": answers, "numeric_values": numeric,
        "numeric_values_scale": np.ones((BATCH, LENGTH), np.float32),
    }  # fmt: skip
    return inputs, labels


def main(argv=None) -> list[dict]:
    args = common.parser(__doc__.splitlines()[0]).parse_args(argv)
    import torch
    import transformers
    from flax import nnx

    import flaxauto

    threads = common.cores()
    torch.set_num_threads(threads)
    repeats = 3 if args.quick else 10
    config = transformers.TapasConfig(**WTQ)
    inputs, labels = table_batch(np.random.default_rng(0))
    with tempfile.TemporaryDirectory() as directory:
        torch.manual_seed(0)
        reference = transformers.TapasForQuestionAnswering(config).eval()
        reference.save_pretrained(directory)
        model = flaxauto.AutoModelForTableQuestionAnswering.from_pretrained(directory)
    torch_inputs = {k: torch.as_tensor(v) for k, v in inputs.items()}
    torch_labels = {k: torch.as_tensor(v) for k, v in labels.items()}

    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    forward = jax.jit(lambda p, x: nnx.merge(graphdef, p, rest)(**x).logits)
    loss = lambda p, x, y: nnx.merge(graphdef, p, rest)(**x, **y).loss  # noqa: E731
    grad = jax.jit(jax.value_and_grad(loss))

    def torch_forward():
        with torch.inference_mode():
            return reference(**torch_inputs).logits

    def torch_grad():
        reference.zero_grad()
        value = reference(**torch_inputs, **torch_labels).loss
        value.backward()
        return value

    error = float(np.max(np.abs(np.asarray(forward(params, inputs)) - torch_forward().numpy())))
    loss_error = abs(float(grad(params, inputs, labels)[0]) - torch_grad().item())
    times = common.interleaved(
        {
            "flax forward": lambda: forward(params, inputs).block_until_ready(),
            "torch forward": torch_forward,
            "flax grad": lambda: jax.block_until_ready(grad(params, inputs, labels)),
            "torch grad": torch_grad,
        },
        repeats,
    )
    case = f"TAPAS WTQ 2 layers {BATCH}x{LENGTH}"
    load = f"{threads} threads each; load average {os.getloadavg()[0]:.1f}"
    return [
        common.row(
            "table", f"{case} forward", common.ms(times["flax forward"]),
            f"torch eager {common.ms(times['torch forward'])}",
            times["flax forward"] / times["torch forward"],
            note=f"max abs diff of the cell logits {error:.1e} (divided by temperature {config.temperature}); {load}",
        ),
        common.row(
            "table", f"{case} weak-supervision loss + grad", common.ms(times["flax grad"]),
            f"torch autograd {common.ms(times['torch grad'])}",
            times["flax grad"] / times["torch grad"],
            note=f"|loss diff| {loss_error:.1e}; {load}",
        ),
    ]  # fmt: skip


if __name__ == "__main__":
    common.report(main(), "table")
