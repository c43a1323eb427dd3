"""GPU: flaxauto beside transformers PyTorch on one accelerator, same weights, same run.

Runs where JAX's default backend is a GPU and PyTorch sees CUDA; elsewhere it returns one
"skipped: no GPU" row. `--dry-run` runs every code path on the CPU at toy sizes (to check it
without a GPU; its figures mean nothing).

Ceilings, measured first in the same process (datasheet figures are leads, not readings):
  - matmul rates: a batched [4, 8192, 8192] x [4, 8192, 8192] product on random data, in bf16,
    in fp32 at precision "highest" (IEEE fp32) and at "tensorfloat32"; a probe against float64
    says which arithmetic each fp32 setting really ran (TF32 shows as a relative error ~3e-4);
  - read bandwidth: a jitted sum over 4 GiB of float32.
Rows (each framework on the same weights: transformers saves them, flaxauto loads them):
  - BERT-base forward, 64 x 512 with padding, in fp32 IEEE, fp32 TF32 and bf16 compute:
    flaxauto with eager attention and with the fused option (ATTENTION_KEYWORD below) vs
    PyTorch sdpa: time, TFLOP/s (matmul FLOPs, counted analytically), and MFU = achieved over
    the measured rate of the same arithmetic (bf16 also over the 989 TFLOP/s datasheet).
  - GPT-2 small greedy decoding (64-token prompt, 128 new), batch 1 and 32, fp32 and bf16
    weights, flaxauto generate vs transformers generate: tokens/s, and the bandwidth fraction =
    (weight bytes + live KV-cache bytes read per step) / step time / measured read bandwidth.
  - BERT-base seq-cls adamw training step, bf16 compute: time and MFU (3x the forward FLOPs).
Timing: perf_counter around calls that block (block_until_ready, torch.cuda.synchronize), the
frameworks interleaved, medians of few repeats after warm-up; compiling is never timed. A time
budget keeps the module under ~4 minutes: a section that would start after it is skipped with
a row saying so. Rows are also written to results/gpu.md as each section ends.

    python benchmarks/gpu.py [--quick] [--dry-run] [--budget SECONDS]
"""

from __future__ import annotations

import copy
import dataclasses
import sys
import tempfile
import time
import traceback

import common
import numpy as np

# The from_pretrained keyword and values that choose flaxauto's attention implementation (as
# the attention branch names them; unset, it is eager on CPU and fused on GPU/TPU there): the
# one place to change if the option lands under other names.
ATTENTION_KEYWORD = "attn_implementation"
EAGER, FUSED = "eager", "fused"

# NVIDIA's H100/H200 SXM datasheet, dense (no sparsity): leads, beside what is measured here.
DATASHEET = {"bf16": 989e12, "tf32": 494e12, "fp32": 67e12, "bandwidth": 4.8e12}


@dataclasses.dataclass(frozen=True)
class Sizes:
    matmul: int = 8192
    matmul_batch: int = 4
    bandwidth_bytes: int = 4 * 2**30
    encoder_batch: int = 64
    encoder_length: int = 512
    decode_prompt: int = 64
    decode_new: int = 128
    decode_batches: tuple[int, ...] = (1, 32)
    vision_batch: int = 64
    train_batch: int = 32
    train_length: int = 512
    repeats: int = 5
    bert: dict = dataclasses.field(default_factory=dict)  # overrides of BertConfig()
    gpt2: dict = dataclasses.field(default_factory=dict)  # overrides of GPT2Config()
    vit: dict = dataclasses.field(default_factory=dict)  # overrides of ViTConfig()


GPU = Sizes()
TOY = dict(max_position_embeddings=64, vocab_size=512)
DRY_RUN = Sizes(
    matmul=128, matmul_batch=2, bandwidth_bytes=2**22, encoder_batch=2, encoder_length=32,
    decode_prompt=8, decode_new=8, decode_batches=(1, 2), vision_batch=2, train_batch=2,
    train_length=32, repeats=1,
    bert=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
              **TOY),
    gpt2=dict(n_embd=64, n_layer=2, n_head=4, n_positions=64, vocab_size=512),
    vit=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128),
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Device:
    torch: str  # where PyTorch runs: "cuda", or "cpu" in a dry run
    label: str  # for the rows' device column

    def synchronize(self) -> None:
        common.synchronize(self.torch)


@dataclasses.dataclass
class Ceilings:
    """What this machine measured in this run: FLOP/s by arithmetic, bytes/s read."""

    rates: dict[str, float]  # "bf16", "fp32" (IEEE), "tf32"
    bandwidth: float


class OutOfTime(Exception):
    pass


class Budget:
    def __init__(self, seconds: float):
        self.deadline = time.perf_counter() + seconds

    def check(self, what: str, needs: float) -> None:
        """Refuse to start `what` (which takes about `needs` seconds) past the deadline."""
        left = self.deadline - time.perf_counter()
        if left < needs:
            raise OutOfTime(f"skipped: {what} needs ~{needs:.0f} s, {max(left, 0):.0f} s left")


# ---------------------------------------------------------------------------------- ceilings


def torch_fp32_matmul_error(device: Device, precision: str) -> float:
    """The same probe for PyTorch at torch.set_float32_matmul_precision(precision)."""
    import torch

    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((2, 512, 512))
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    ta, tb = (torch.tensor(x, dtype=torch.float32, device=device.torch) for x in (a, b))
    got = (ta @ tb).cpu().double().numpy()
    torch.set_float32_matmul_precision(before)
    return float(np.linalg.norm(got - a @ b) / np.linalg.norm(a @ b))


def matmul_rate(sizes: Sizes, dtype, precision: str | None, repeats: int) -> float:
    """FLOP/s of a batched square product on random data (never zeros: they run faster)."""
    import jax
    import jax.numpy as jnp

    n, batch = sizes.matmul, sizes.matmul_batch
    keys = jax.random.split(jax.random.key(0))
    x, y = (jax.random.normal(k, (batch, n, n), dtype) for k in keys)
    with common.precision_scope(precision):
        product = jax.jit(lambda x, y: jnp.einsum("bij,bjk->bik", x, y)).lower(x, y).compile()
    seconds = common.interleaved({"product": lambda: product(x, y).block_until_ready()}, repeats)
    return 2 * batch * n**3 / seconds["product"]


def read_bandwidth(sizes: Sizes, repeats: int) -> float:
    """Bytes/s a jitted sum reads from a float32 array far larger than the L2 cache."""
    import jax
    import jax.numpy as jnp

    data = jax.random.normal(jax.random.key(2), (sizes.bandwidth_bytes // 4,), jnp.float32)
    total = jax.jit(jnp.sum).lower(data).compile()
    seconds = common.interleaved({"sum": lambda: total(data).block_until_ready()}, repeats)
    return sizes.bandwidth_bytes / seconds["sum"]


def measure_ceilings(sizes: Sizes, device: Device, repeats: int) -> tuple[Ceilings, list[dict]]:
    import jax.numpy as jnp

    rates = {
        "bf16": matmul_rate(sizes, jnp.bfloat16, None, repeats),
        "fp32": matmul_rate(sizes, jnp.float32, "highest", repeats),
        "tf32": matmul_rate(sizes, jnp.float32, "tensorfloat32", repeats),
    }
    bandwidth = read_bandwidth(sizes, repeats + 5)
    ceilings = Ceilings(rates, bandwidth)
    shape = f"[{sizes.matmul_batch}, {sizes.matmul}, {sizes.matmul}]^2"
    probes = {
        "fp32": common.jax_fp32_matmul_error("highest"),
        "tf32": common.jax_fp32_matmul_error("tensorfloat32"),
        "default": common.jax_fp32_matmul_error(None),
    }
    rows = []
    for kind, precision in (("bf16", "default"), ("fp32", "highest"), ("tf32", "tensorfloat32")):
        note = f"jax precision {precision!r}"
        if kind != "bf16":
            note += f": ran {common.arithmetic(probes[kind])}"
        if kind == "fp32":
            note += f"; jax's default fp32 matmuls run {common.arithmetic(probes['default'])}"
        rows.append(row(
            device, f"peak: {kind} matmul {shape}", f"jax {rates[kind] / 1e12:.0f} TFLOP/s",
            f"datasheet {DATASHEET[kind] / 1e12:.0f} TFLOP/s dense",
            rates[kind] / DATASHEET[kind], note,
        ))  # fmt: skip
    import torch

    default = torch.get_float32_matmul_precision()
    torch_default = torch_fp32_matmul_error(device, default)
    torch_high = torch_fp32_matmul_error(device, "high")
    rows.append(row(
        device, f"peak: read bandwidth, jitted sum over {sizes.bandwidth_bytes / 2**30:.0f} GiB",
        f"jax {bandwidth / 1e12:.2f} TB/s", f"datasheet {DATASHEET['bandwidth'] / 1e12:.1f} TB/s",
        bandwidth / DATASHEET["bandwidth"],
        f"torch fp32 matmuls: {default!r} (its default) ran {common.arithmetic(torch_default)}, "
        f"'high' ran {common.arithmetic(torch_high)}",
    ))  # fmt: skip
    return ceilings, rows


# ----------------------------------------------------------------------------------- encoder

# mode -> (flaxauto compute dtype, jax matmul precision, torch fp32 matmul precision, autocast)
ENCODER_MODES = {
    "fp32 IEEE": (None, "highest", "highest", False),
    "fp32 TF32": (None, "tensorfloat32", "high", False),
    "bf16 compute": ("bfloat16", None, "highest", True),
}
MODE_ARITHMETIC = {"fp32 IEEE": "fp32", "fp32 TF32": "tf32", "bf16 compute": "bf16"}


def load_with_attention(auto_class, directory: str, attention: str, **options):
    """A flaxauto model with `attention`, asked for by name (where the option exists, the default
    may be fused on a GPU). Returns (model, why not): model None where the option is refused;
    for eager, a refused option means eager is all there is, so it loads without the keyword."""
    try:
        return auto_class.from_pretrained(
            directory, **{ATTENTION_KEYWORD: attention}, **options
        ), ""
    except (TypeError, ValueError, NotImplementedError) as error:
        if attention == EAGER and isinstance(error, TypeError):
            return auto_class.from_pretrained(directory, **options), ""
        line = (str(error).strip().splitlines() or [""])[0]
        return (
            None,
            f"{ATTENTION_KEYWORD}={attention!r} unavailable: {type(error).__name__}: {line}",
        )


def lower_encoder(model, inputs: dict, precision: str | None):
    """The jitted forward over nnx.split state, lowered (not compiled: comparing programs is
    cheap). Returns (lowered, state)."""
    import jax
    from flax import nnx

    graphdef, state = nnx.split(model)

    def forward(state, inputs):
        return nnx.merge(graphdef, state)(**inputs).last_hidden_state

    with common.precision_scope(precision):
        return jax.jit(forward).lower(state, inputs), state


def compile_encoder(lowered, state, inputs: dict):
    """Returns (run, output, whether the optimised program calls cuDNN's fused attention)."""
    compiled = lowered.compile()
    output = np.asarray(compiled(state, inputs), np.float32)
    cudnn = "cudnn$fmha" in compiled.as_text()
    return lambda: compiled(state, inputs).block_until_ready(), output, cudnn


def torch_encoder_forward(model, ids, mask, device: Device, precision: str, autocast: bool):
    import torch

    def run():
        torch.set_float32_matmul_precision(precision)
        with torch.inference_mode(), torch.autocast(device.torch, torch.bfloat16, enabled=autocast):
            output = model(input_ids=ids, attention_mask=mask).last_hidden_state
        device.synchronize()
        return output

    return run


def utilisation(flops: int, seconds: float, peak: float) -> str:
    return f"{common.ms(seconds)}, {flops / seconds / 1e12:.0f} TFLOP/s, MFU {flops / seconds / peak:.0%}"


def encoder_programs(models, reasons, directory, dtype, precision, inputs):
    """The lowered forwards for one mode, eager and (where it exists) fused, loading models not
    yet in `models` ((attention, dtype) -> model or None; `reasons` says why None). Returns
    (attention -> (lowered, state), why the fused program is missing or "")."""
    import jax.numpy as jnp

    import flaxauto

    lowered, missing = {}, ""
    for attention in (EAGER, FUSED):
        if (attention, dtype) not in models:
            options = {"dtype": getattr(jnp, dtype)} if dtype else {}
            models[attention, dtype], reasons[attention, dtype] = load_with_attention(
                flaxauto.AutoModel, directory, attention, **options
            )
        missing = missing or reasons[attention, dtype]
        if models[attention, dtype] is not None:
            lowered[attention] = lower_encoder(models[attention, dtype], inputs, precision)
    if FUSED in lowered and lowered[FUSED][0].as_text() == lowered[EAGER][0].as_text():
        del lowered[FUSED]  # an option that changes nothing must not be timed as "fused"
        missing = f"{ATTENTION_KEYWORD}={FUSED!r} was accepted but built the eager program"
    return lowered, missing


def encoder_note(mode, flops, times, attention, error, cudnn, peak) -> str:
    _, precision, torch_precision, _ = ENCODER_MODES[mode]
    kind = MODE_ARITHMETIC[mode]
    note = f"MFU over the measured {kind} matmul rate {peak / 1e12:.0f} TFLOP/s"
    if kind == "bf16":
        datasheet = DATASHEET["bf16"]
        note += (
            f"; of the {datasheet / 1e12:.0f} TFLOP/s datasheet: flaxauto "
            f"{flops / times[attention] / datasheet:.0%}, torch "
            f"{flops / times['torch'] / datasheet:.0%}"
        )
    else:
        note += f"; jax precision {precision!r}, torch {torch_precision!r}"
    return (
        f"{note}; max abs diff vs torch {error:.1e}; cuDNN fused attention in the program: "
        f"{'yes' if cudnn else 'no'}; ratio: time, lower is better"
    )


def attention_rows(device, case, mode, flops, forwards, run_torch, ceilings, repeats, missing):
    """One row per compiled flaxauto forward (eager, fused) beside PyTorch's, timed in turns;
    plus a row saying why the fused program is missing, where it is."""
    autocast = ENCODER_MODES[mode][3]
    expected = run_torch().float().cpu().numpy()
    fns = {attention: forward[0] for attention, forward in forwards.items()}
    times = common.interleaved({**fns, "torch": run_torch}, repeats)
    peak = ceilings.rates[MODE_ARITHMETIC[mode]]
    rows = []
    for attention, (_, output, cudnn) in forwards.items():
        error = float(np.max(np.abs(output - expected)))
        rows.append(row(
            device, f"{case}, {mode}, flaxauto {attention} attention",
            utilisation(flops, times[attention], peak),
            f"torch sdpa{' autocast' if autocast else ''} "
            f"{utilisation(flops, times['torch'], peak)}",
            times[attention] / times["torch"],
            encoder_note(mode, flops, times, attention, error, cudnn, peak),
        ))  # fmt: skip
    if missing:
        rows.append(row(device, f"{case}, {mode}, flaxauto fused attention", "", "",
                        note=missing))  # fmt: skip
    return rows


def encoder_rows(sizes, device, ceilings, repeats, budget: Budget) -> list[dict]:
    import jax.numpy as jnp
    import torch
    import transformers
    from encoder import model_flops

    config = transformers.BertConfig(**sizes.bert)
    batch, length = sizes.encoder_batch, sizes.encoder_length
    rng = np.random.default_rng(0)
    ids = rng.integers(0, config.vocab_size, (batch, length))
    mask = np.ones((batch, length), np.int32)
    mask[1::4, length * 3 // 4 :] = 0  # a quarter of the rows padded, as real batches are
    inputs = {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask)}
    torch_ids = torch.tensor(ids, device=device.torch)
    torch_mask = torch.tensor(mask, device=device.torch)
    flops = model_flops(config, batch, length)
    case = f"BERT-base {batch}x{length} forward"
    rows, models, reasons = [], {}, {}
    with tempfile.TemporaryDirectory() as directory:
        torch.manual_seed(0)
        transformers.BertModel(config).save_pretrained(directory)
        reference = transformers.BertModel.from_pretrained(directory, attn_implementation="sdpa")
        reference = reference.to(device.torch).eval()
        for mode, (dtype, precision, torch_precision, autocast) in ENCODER_MODES.items():
            budget.check(f"{case} {mode}", 20)
            lowered, missing = encoder_programs(
                models, reasons, directory, dtype, precision, inputs
            )
            forwards = {
                name: compile_encoder(*program, inputs) for name, program in lowered.items()
            }
            run_torch = torch_encoder_forward(
                reference, torch_ids, torch_mask, device, torch_precision, autocast
            )
            rows += attention_rows(
                device, case, mode, flops, forwards, run_torch, ceilings, repeats, missing
            )
            del forwards, lowered
    return rows


# ------------------------------------------------------------------------------------ vision

VISION_MODES = ("fp32 TF32", "bf16 compute")  # IEEE fp32 is BERT's row's story already


def vision_rows(sizes, device, ceilings, repeats, budget: Budget) -> list[dict]:
    """ViT-base at 224 x 224: the same eager / fused / torch sdpa comparison as BERT's rows."""
    import jax.numpy as jnp
    import torch
    import transformers
    from vit import SIZE, model_flops

    config = transformers.ViTConfig(image_size=SIZE, **sizes.vit)
    batch = sizes.vision_batch
    pixels = np.random.default_rng(0).standard_normal((batch, 3, SIZE, SIZE), np.float32)
    inputs = {"pixel_values": jnp.asarray(pixels)}
    torch_pixels = torch.tensor(pixels, device=device.torch)
    flops = model_flops(config, batch) - 2 * batch * config.hidden_size * config.num_labels
    case = f"ViT-base {SIZE}px batch {batch} forward"
    rows, models, reasons = [], {}, {}
    with tempfile.TemporaryDirectory() as directory:
        torch.manual_seed(0)
        transformers.ViTModel(config, add_pooling_layer=False).save_pretrained(directory)
        reference = transformers.ViTModel.from_pretrained(
            directory, attn_implementation="sdpa", add_pooling_layer=False
        )
        reference = reference.to(device.torch).eval()
        for mode in VISION_MODES:
            dtype, precision, torch_precision, autocast = ENCODER_MODES[mode]
            budget.check(f"{case} {mode}", 25)
            lowered, missing = encoder_programs(
                models, reasons, directory, dtype, precision, inputs
            )
            forwards = {
                name: compile_encoder(*program, inputs) for name, program in lowered.items()
            }

            def run_torch(precision=torch_precision, autocast=autocast):
                torch.set_float32_matmul_precision(precision)
                with (
                    torch.inference_mode(),
                    torch.autocast(device.torch, torch.bfloat16, enabled=autocast),
                ):
                    output = reference(pixel_values=torch_pixels).last_hidden_state
                device.synchronize()
                return output

            rows += attention_rows(
                device, case, mode, flops, forwards, run_torch, ceilings, repeats, missing
            )
            del forwards, lowered
    return rows


# ------------------------------------------------------------------------------------ decode


def decode_bytes_per_step(model, config, batch: int, sizes: Sizes) -> tuple[int, int]:
    """(weight bytes, live KV-cache bytes) one greedy step reads, averaged over the steps: step
    t attends to prompt + t positions, keys and values of every layer, in the weights' dtype."""
    import jax
    from decode import bytes_per_step
    from flax import nnx

    weights = bytes_per_step(model)
    itemsize = jax.tree.leaves(nnx.state(model, nnx.Param))[0].dtype.itemsize
    live = sizes.decode_prompt + (sizes.decode_new - 1) / 2
    cache = 2 * config.n_layer * batch * live * config.n_embd * itemsize
    return weights, int(cache)


def decode_rows(sizes, device, ceilings, repeats, budget: Budget) -> list[dict]:
    import jax.numpy as jnp
    import torch
    import transformers

    import flaxauto

    config = transformers.GPT2Config(**sizes.gpt2)
    with tempfile.TemporaryDirectory() as directory:
        torch.manual_seed(0)
        transformers.GPT2LMHeadModel(config).save_pretrained(directory)
        reference = transformers.GPT2LMHeadModel.from_pretrained(
            directory, attn_implementation="sdpa"
        )
        reference = reference.to(device.torch).eval()
        models = {
            "fp32": flaxauto.AutoModelForCausalLM.from_pretrained(directory),
            "bf16": flaxauto.AutoModelForCausalLM.from_pretrained(
                directory, param_dtype=jnp.bfloat16
            ),
        }
    references = {"fp32": reference, "bf16": copy.deepcopy(reference).to(torch.bfloat16)}
    rows, repeats = [], min(repeats, 3)  # transformers' generate takes seconds a call
    for batch in sizes.decode_batches:
        for dtype, model in models.items():
            budget.check(f"decode batch {batch} {dtype}", 25)  # ~10 s compile, ~1-2 s a run
            ids = np.random.default_rng(batch).integers(
                0, config.vocab_size, (batch, sizes.decode_prompt)
            )
            rows.append(
                decode_row(
                    sizes, device, ceilings, repeats, config, dtype, batch, ids, model,
                    references[dtype],
                )
            )  # fmt: skip
    return rows


def decode_row(sizes, device, ceilings, repeats, config, dtype, batch, ids, model, reference):
    import torch

    new = sizes.decode_new
    settings = dict(max_new_tokens=new, min_new_tokens=new)
    torch_ids = torch.as_tensor(ids, device=device.torch)
    torch_mask = torch.ones_like(torch_ids)

    def ours():
        # IEEE fp32 matmuls, as PyTorch's default, so that the fp32 tokens can agree
        with common.precision_scope("highest"):
            return np.asarray(model.generate(ids, **settings))

    def theirs():
        torch.set_float32_matmul_precision("highest")
        with torch.inference_mode():
            tokens = reference.generate(
                torch_ids, attention_mask=torch_mask, do_sample=False, **settings
            )
        device.synchronize()
        return tokens.cpu().numpy()

    same = np.mean(ours() == theirs())
    times = common.interleaved({"flaxauto": ours, "torch": theirs}, repeats, warmup=1)
    weights, cache = decode_bytes_per_step(model, config, batch, sizes)
    moved = weights + cache

    def figures(seconds: float) -> str:
        step = seconds / new
        fraction = moved / step / ceilings.bandwidth
        return f"{batch * new / seconds:.0f} tok/s, {common.ms(step)}/step, {fraction:.0%} of bandwidth"

    return row(
        device,
        f"GPT-2 small greedy, {dtype} weights, batch {batch}, prompt {sizes.decode_prompt} + "
        f"{new} new",
        figures(times["flaxauto"]),
        f"transformers {figures(times['torch'])}",
        times["torch"] / times["flaxauto"],
        f"ratio: tokens/s, higher is better; {moved / 2**20:.0f} MiB/step (weights "
        f"{weights / 2**20:.0f} + live KV cache {cache / 2**20:.0f}) over the measured "
        f"{ceilings.bandwidth / 1e12:.2f} TB/s; step time includes the prefill; fp32 matmuls "
        f"IEEE on both; tokens identical {same:.0%}; flaxauto's default attention "
        f"({ATTENTION_KEYWORD} unset), torch sdpa",
    )


# ---------------------------------------------------------------------------------- training


def training_times(sizes, device, repeats, dropout=True, optimizer="adamw"):
    """Median seconds of flaxauto's and PyTorch's BERT-base seq-cls AdamW step with bf16
    compute on the same weights. `dropout` False zeroes both models' dropout; `optimizer` is
    flaxauto's: "adamw", "sgd" (the gradients consumed by the cheapest update), or "none" (no
    update, so XLA drops the backward pass: the forward and the loss alone). PyTorch's step stays
    whole."""
    import jax
    import jax.numpy as jnp
    import optax
    import torch
    import transformers
    from flax import nnx
    from training import training_step

    import flaxauto

    rates = {} if dropout else dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    config = transformers.BertConfig(num_labels=3, **sizes.bert, **rates)
    batch, length = sizes.train_batch, sizes.train_length
    rng = np.random.default_rng(0)
    ids = rng.integers(0, config.vocab_size, (batch, length))
    mask = np.ones((batch, length), np.int32)
    labels = rng.integers(0, 3, (batch,))
    with tempfile.TemporaryDirectory() as directory:
        torch.manual_seed(0)
        transformers.BertForSequenceClassification(config).save_pretrained(directory)
        theirs = transformers.BertForSequenceClassification.from_pretrained(
            directory, attn_implementation="sdpa"
        )
        ours = flaxauto.AutoModelForSequenceClassification.from_pretrained(
            directory, dtype=jnp.bfloat16
        )
    theirs = theirs.to(device.torch).train()
    ours.train()  # dropout on, as in torch's train()

    optimizer = {
        "adamw": lambda: optax.adamw(1e-4, weight_decay=0.01),  # torch AdamW's default decay
        "sgd": lambda: optax.sgd(1e-4),
        "none": optax.set_to_zero,
    }[optimizer]()
    _, params, rest = nnx.split(ours, nnx.Param, ...)
    state = [params, optimizer.init(params), rest]
    host_inputs = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    inputs = jax.device_put({k: jnp.asarray(v) for k, v in host_inputs.items()})
    step = training_step(ours, optimizer).lower(*state, inputs).compile()

    def flax_step():
        state[0], state[1], state[2], loss = step(*state, inputs)
        loss.block_until_ready()

    adamw = torch.optim.AdamW(
        theirs.parameters(), lr=1e-4, weight_decay=0.01, fused=device.torch == "cuda"
    )
    # from the host arrays: the labels stay int64, as torch's cross entropy needs
    torch_inputs = {k: torch.as_tensor(v, device=device.torch) for k, v in host_inputs.items()}

    def torch_step():
        with torch.autocast(device.torch, torch.bfloat16):
            loss = theirs(**torch_inputs).loss
        loss.backward()
        adamw.step()
        adamw.zero_grad(set_to_none=True)
        device.synchronize()

    times = common.interleaved({"flaxauto": flax_step, "torch": torch_step}, repeats)
    return times["flaxauto"], times["torch"]


def training_case(sizes) -> str:
    return f"BERT-base seq-cls {sizes.train_batch}x{sizes.train_length} adamw step, bf16 compute"


def training_rows(sizes, device, ceilings, repeats, budget: Budget) -> list[dict]:
    from encoder import model_flops

    budget.check("training step", 60)
    ours, theirs = training_times(sizes, device, repeats)
    config = _bert_config(sizes)
    flops = 3 * model_flops(config, sizes.train_batch, sizes.train_length)  # backward ~ 2x
    peak = ceilings.rates["bf16"]
    return [row(
        device, training_case(sizes),
        utilisation(flops, ours, peak),
        f"torch autocast bf16, {'fused ' if device.torch == 'cuda' else ''}AdamW {utilisation(flops, theirs, peak)}",
        ours / theirs,
        f"ratio: time, lower is better; MFU over the measured bf16 rate {peak / 1e12:.0f} "
        f"TFLOP/s (3x forward matmul FLOPs); fp32 params and optimizer state on both; "
        f"dropout on; flaxauto's default attention ({ATTENTION_KEYWORD} unset), torch sdpa",
    )]  # fmt: skip


def _bert_config(sizes):
    import transformers

    return transformers.BertConfig(num_labels=3, **sizes.bert)


# Where the training step's time goes: each variant changes one thing against the row above.
TRAINING_VARIANTS = {
    "dropout off (both)": dict(dropout=False),
    "dropout off, flaxauto plain SGD (no AdamW state)": dict(dropout=False, optimizer="sgd"),
    "dropout off, flaxauto forward and loss only (no update: XLA drops the backward)": dict(
        dropout=False, optimizer="none"
    ),
}


def training_variant_rows(sizes, device, ceilings, repeats, budget: Budget) -> list[dict]:
    rows = []
    for name, options in TRAINING_VARIANTS.items():
        budget.check(f"training variant {name}", 45)
        ours, theirs = training_times(sizes, device, repeats, **options)
        rows.append(row(
            device, f"{training_case(sizes)}: {name}", common.ms(ours),
            f"torch {common.ms(theirs)}", ours / theirs, "ratio: time, lower is better",
        ))  # fmt: skip
    return rows


# -------------------------------------------------------------------------------------- main

SECTIONS = {
    "encoder": encoder_rows,
    "vision": vision_rows,
    "decode": decode_rows,
    "training": training_rows,
    "training-variants": training_variant_rows,
}


def row(device: Device, case, flaxauto, alternative, ratio=None, note="") -> dict:
    return {
        **common.row("gpu", case, flaxauto, alternative, ratio, note=note),
        "device": device.label,
    }


def gpu_device() -> Device | None:
    if not common.on_gpu():
        return None
    return Device("cuda", common.devices_label())


def main(argv=None) -> list[dict]:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="every code path on CPU, toy sizes")
    p.add_argument("--budget", type=float, default=210.0, help="seconds; later sections skip")
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS),
                   help="after the ceilings, run only these (in this order)")  # fmt: skip
    args = p.parse_args(argv)
    budget = Budget(args.budget)
    import jax
    import torch

    if args.dry_run:
        device, sizes = Device("cpu", "cpu (dry run: toy sizes, figures meaningless)"), DRY_RUN
    else:
        device, sizes = gpu_device(), GPU
    if device is None:
        why = f"jax backend {jax.default_backend()}, torch.cuda {torch.cuda.is_available()}"
        return [common.row("gpu", "skipped: no GPU", "", "", note=why)]
    repeats = 2 if args.quick else sizes.repeats
    rows: list[dict] = []
    try:
        ceilings, ceiling_rows = measure_ceilings(sizes, device, repeats)
    except Exception as error:  # without ceilings no utilisation can be computed
        traceback.print_exc()
        return [failed(device, "ceilings", error)]
    publish(rows, ceiling_rows)
    for name in args.sections:
        section = SECTIONS[name]
        start = time.perf_counter()
        try:
            new = section(sizes, device, ceilings, repeats, budget)
        except OutOfTime as skipped:
            new = [row(device, name, "", "", note=str(skipped))]
        except Exception as error:  # one broken section must not hide the others' rows
            traceback.print_exc()
            new = [failed(device, name, error)]
        print(f"-- gpu {name}: {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
        publish(rows, new)
        if device.torch == "cuda":
            torch.cuda.empty_cache()
    return rows


def failed(device: Device, name: str, error: Exception) -> dict:
    line = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return row(device, f"{name}: failed", "", "", note=f"{type(error).__name__}: {line}")


def publish(rows: list[dict], new: list[dict]) -> None:
    """Add `new` and write everything so far to results/gpu.md: if the run is cut short by a
    timeout, the sections already done still come back."""
    rows += new
    print(common.table(new), file=sys.stderr, flush=True)
    common.RESULTS.mkdir(exist_ok=True)
    (common.RESULTS / "gpu.md").write_text(common.table(rows) + "\n")


if __name__ == "__main__":
    common.report(main(), "gpu")
