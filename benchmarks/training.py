"""Training step memory: remat=True vs False, for BERT-base sequence classification (memory and
step time) and GPT-2 small causal LM (memory); and training throughput (samples/s) of both beside
transformers PyTorch with torch eager AdamW, fp32 and with bf16 compute.

One step = loss from labels, jax.value_and_grad over the nnx.split parameters, optax adamw
update, with dropout on (model.train()); parameters and optimizer state are donated. Memory is
XLA's own account of the compiled step (compiled.memory_analysis()): temp is what the step
allocates beyond its inputs and outputs (activations kept for the backward pass, workspace);
peak adds the arguments and outputs not aliased to them. The step time is measured too: remat
recomputes each layer's forward in the backward pass.

    python benchmarks/training.py [--quick] [--layers N]

--quick runs the throughput rows alone, at full size (12 layers, 8 x 128), one timed step
each after one warm-up step; --layers shrinks both models for a smoke run.
"""

from __future__ import annotations

import common

BATCH, LENGTH, LAYERS = 8, 128, 12
CASES = {  # name -> (transformers config class, flaxauto Auto class name, labels)
    f"BERT-base {LAYERS} layers seq-cls": (
        "BertConfig",
        "AutoModelForSequenceClassification",
        "class",
    ),
    f"GPT-2 small {LAYERS} layers causal-lm": ("GPT2Config", "AutoModelForCausalLM", "tokens"),
}


def training_step(model, optimizer):
    """A jitted step(params, opt_state, rest, batch) -> (params, opt_state, rest, loss)."""
    import jax
    import optax
    from flax import nnx

    graphdef, _, _ = nnx.split(model, nnx.Param, ...)

    def loss_fn(params, rest, batch):
        # copy: grad passes `rest` through untraced, and dropout may only advance RNG state
        # (Variables) created at the trace level that mutates it
        model = nnx.merge(graphdef, params, rest, copy=True)
        loss = model(**batch).loss
        return loss, nnx.state(model, nnx.Not(nnx.Param))  # dropout advanced its RNG streams

    def step(params, opt_state, rest, batch):
        (loss, rest), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, rest, batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, rest, loss

    return jax.jit(step, donate_argnums=(0, 1, 2))


def measure(case: str, remat: bool, scan: bool, repeats: int) -> dict:
    import jax
    import numpy as np
    import optax
    import transformers
    from flax import nnx

    import flaxauto

    config_class, auto_class, labels = CASES[case]
    config = getattr(transformers, config_class)(num_hidden_layers=LAYERS, num_labels=3)
    options = {"remat": True} if remat else {}
    options |= {"scan_layers": True} if scan else {}
    build = lambda: getattr(flaxauto, auto_class).from_config(config, **options)  # noqa: E731
    # memory needs only shapes; timing a step needs real weights
    model = build() if repeats else nnx.eval_shape(build)
    model.train()
    optimizer = optax.adamw(1e-4)
    _, params, rest = nnx.split(model, nnx.Param, ...)
    opt_state = optimizer.init(params) if repeats else jax.eval_shape(optimizer.init, params)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, config.vocab_size, (BATCH, LENGTH))
    batch = {
        "input_ids": ids,
        "attention_mask": np.ones((BATCH, LENGTH), np.int32),
        "labels": ids if labels == "tokens" else rng.integers(0, 3, (BATCH,)),
    }
    step = training_step(model, optimizer)
    compiled = step.lower(params, opt_state, rest, batch).compile()
    memory = compiled.memory_analysis()
    state = [params, opt_state, rest]

    def run():
        state[0], state[1], state[2], loss = compiled(*state, batch)
        loss.block_until_ready()

    seconds = common.interleaved({"step": run}, repeats, warmup=1)["step"] if repeats else None
    peak = (
        memory.argument_size_in_bytes
        + memory.output_size_in_bytes
        - memory.alias_size_in_bytes
        + memory.temp_size_in_bytes
    )
    return dict(temp=memory.temp_size_in_bytes, peak=peak, seconds=seconds)


def main(argv=None) -> list[dict]:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=LAYERS, help="layers of both models")
    args = p.parse_args(argv)
    rows = []
    if not args.quick:
        for case in CASES:
            # the GPT-2 rows: memory only (no weights, no step run)
            repeats = 0 if "GPT-2" in case else 3
            rows += [compare(case, scan, repeats) for scan in (False, True)]
    # throughput beside torch eager AdamW, full size; --quick: one timed step each
    repeats = 1 if args.quick else 3
    for case in CASES:
        rows += [throughput(case, bf16, args.layers, repeats) for bf16 in (False, True)]
    return rows


def throughput(case: str, bf16: bool, layers: int, repeats: int) -> dict:
    """Training samples/s of one AdamW step (dropout on), flaxauto (jitted step over the split
    state, fp32 master weights; bf16: compute dtype bf16) beside transformers PyTorch with
    torch.optim.AdamW (eager; bf16: torch.autocast) on the same weights and batch."""
    import jax.numpy as jnp
    import numpy as np
    import optax
    import torch
    import transformers
    from flax import nnx

    import flaxauto

    config_class, auto_class, labels = CASES[case]
    config = getattr(transformers, config_class)(num_hidden_layers=layers, num_labels=3)
    torch_class = (
        transformers.BertForSequenceClassification
        if labels == "class"
        else transformers.GPT2LMHeadModel
    )
    torch.manual_seed(0)
    reference = torch_class(config).train()
    import tempfile

    with tempfile.TemporaryDirectory() as directory:
        reference.save_pretrained(directory)
        dtype = {"dtype": jnp.bfloat16} if bf16 else {}
        model = getattr(flaxauto, auto_class).from_pretrained(directory, **dtype)
    model.train()
    rng = np.random.default_rng(0)
    ids = rng.integers(0, config.vocab_size, (BATCH, LENGTH))
    batch = {
        "input_ids": ids,
        "attention_mask": np.ones((BATCH, LENGTH), np.int32),
        "labels": ids if labels == "tokens" else rng.integers(0, 3, (BATCH,)),
    }
    optimizer = optax.adamw(1e-5)
    _, params, rest = nnx.split(model, nnx.Param, ...)
    state = [params, optimizer.init(params), rest]
    step = training_step(model, optimizer)

    def ours():
        state[0], state[1], state[2], loss = step(*state, batch)
        loss.block_until_ready()

    torch_optimizer = torch.optim.AdamW(reference.parameters(), lr=1e-5)
    torch_batch = {k: torch.as_tensor(v) for k, v in batch.items()}

    def theirs():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = reference(**torch_batch).loss
        loss.backward()
        torch_optimizer.step()
        torch_optimizer.zero_grad(set_to_none=True)

    seconds = common.interleaved({"ours": ours, "theirs": theirs}, repeats, warmup=1)
    per_second = {name: BATCH / t for name, t in seconds.items()}
    print(f"{case} bf16={bf16}: {per_second}", flush=True)  # progress of a long run
    precision = "bf16 compute, fp32 weights" if bf16 else "fp32"
    name = case.replace(f"{LAYERS} layers", f"{layers} layers")
    return common.row(
        "training",
        f"{name} {BATCH}x{LENGTH} AdamW step, {precision}: samples/s",
        f"{per_second['ours']:.3g}/s",
        f"torch eager AdamW {per_second['theirs']:.3g}/s",
        per_second["ours"] / per_second["theirs"],
        note="throughput ratio (higher is better for flaxauto); medians of interleaved steps",
    )


def compare(case: str, scan: bool, repeats: int) -> dict:
    plain, remat = measure(case, False, scan, repeats), measure(case, True, scan, repeats)
    note = f"ratio of temp memory; peak {remat['peak'] / plain['peak']:.2f}x"
    if repeats:
        note += f"; step {remat['seconds']:.1f} s vs {plain['seconds']:.1f} s"
    return common.row(
        "training",
        f"{case} {BATCH}x{LENGTH} adamw step, scan_layers={scan}: remat=True",
        f"temp {common.mib(remat['temp'])}, peak {common.mib(remat['peak'])}",
        f"remat=False: temp {common.mib(plain['temp'])}, peak {common.mib(plain['peak'])}",
        remat["temp"] / plain["temp"],
        note=note,
    )


if __name__ == "__main__":
    common.report(main(), "training")
