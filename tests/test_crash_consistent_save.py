"""save_pretrained over an existing checkpoint is crash-consistent.

Every file-system step of a save (write, fsync, link, rename, exchange) is made to fail in
turn, as a failing rename or a full disk would, and the directory is then loaded with
transformers: it must be wholly the earlier checkpoint or wholly the new one (config.json,
generation_config.json and every tensor). A kill is modelled by copying the directory as it stands
before each step: what a kill at that instant would leave. Shapes of the saves: same shard names
re-saved, single file -> sharded, sharded -> single file.
"""

import errno
import hashlib
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy
import transformers

from flaxauto import modeling
from flaxauto.converters import files

TINY_GPT2 = dict(vocab_size=64, n_positions=32, n_embd=16, n_layer=2, n_head=2)
SHARDED, SINGLE = "12KB", "5GB"  # the tiny model is about 30 KB: three shards, or one file


def _model(seed: int, marker: str):
    config = transformers.GPT2Config(**TINY_GPT2, summary_type=marker)  # a config that differs
    model = modeling.from_config(config, "causal-lm", seed=seed)
    model.generation_config.max_length = 10 + seed  # and a generation config that differs
    return model


@pytest.fixture(scope="module")
def models():
    return _model(1, "last"), _model(2, "mean")


def _as_transformers_sees_it(directory: Path) -> dict:
    """Everything transformers reads from the directory, comparable with ==."""
    model = transformers.GPT2LMHeadModel.from_pretrained(directory)
    generation = transformers.GenerationConfig.from_pretrained(directory)
    return {
        "config": model.config.summary_type,
        "max_length": generation.max_length,
        "tensors": {k: v.numpy().tobytes() for k, v in model.state_dict().items()},
    }


def _fingerprint(directory: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            digest.update(str(path.relative_to(directory)).encode() + path.read_bytes())
    return digest.hexdigest()


class _Steps:
    """Counts file-system steps of a save; fails the k-th, or snapshots the folder before each."""

    def __init__(self, monkeypatch, directory: Path, *, fail_at=None, error=None, snapshot=None):
        self.count, self.fail_at, self.error = 0, fail_at, error
        self.directory, self.snapshot = directory, snapshot
        for module, name in [
            (os, "replace"), (os, "rename"), (os, "link"), (os, "fsync"),
            (files, "exchange_paths"), (files, "_write"), (safetensors.numpy, "save_file"),
        ]:  # fmt: skip
            monkeypatch.setattr(module, name, self._wrap(getattr(module, name)))

    def _wrap(self, function):
        def step(*args, **kwargs):
            self.count += 1
            if self.snapshot is not None:
                self.snapshot(self.directory)
            if self.count == self.fail_at:
                raise self.error
            return function(*args, **kwargs)

        return step


SHAPES = {
    "same shard names": (SHARDED, SHARDED),
    "single -> sharded": (SINGLE, SHARDED),
    "sharded -> single": (SHARDED, SINGLE),
}


def _prepare(tmp_path: Path, models, shape):
    """An earlier checkpoint with a tokenizer-like file beside it, and what transformers reads
    from the earlier and from the new checkpoint."""
    (old_size, new_size), (old, new) = SHAPES[shape], models
    reference_new = tmp_path / "reference-new"
    new.save_pretrained(reference_new, max_shard_size=new_size)
    earlier = tmp_path / "earlier"
    old.save_pretrained(earlier, max_shard_size=old_size)
    (earlier / "tokenizer.json").write_text('{"kept": true}')
    seen = {
        "old": _as_transformers_sees_it(earlier),
        "new": _as_transformers_sees_it(reference_new),
    }
    assert seen["old"] != seen["new"]
    return earlier, seen


def _check(directory: Path, seen: dict, cache: dict) -> str:
    key = _fingerprint(directory)
    if key not in cache:
        state = _as_transformers_sees_it(directory)
        matches = [name for name, want in seen.items() if state == want]
        assert matches, f"{directory}: neither the earlier nor the new checkpoint"
        assert (directory / "tokenizer.json").read_text() == '{"kept": true}'
        assert not [p for p in directory.iterdir() if p.name.startswith(".")]
        cache[key] = matches[0]
    return cache[key]


def _no_staging_left(parent: Path) -> None:
    assert not [p.name for p in parent.iterdir() if "flaxauto-save" in p.name]


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("commit", ["exchange", "file by file"])
def test_a_failing_step_leaves_wholly_the_old_or_wholly_the_new_checkpoint(
    tmp_path, monkeypatch, models, shape, commit
):
    earlier, seen = _prepare(tmp_path, models, shape)
    target, cache, outcomes = tmp_path / "target", {}, []
    if commit == "file by file":  # a file system without renameat2's exchange
        monkeypatch.setattr(files, "exchange_paths", _no_exchange)
    errors = [OSError(errno.EIO, "rename failed"), OSError(errno.ENOSPC, "No space left")]
    k = 0
    while True:
        k += 1
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(earlier, target)
        with monkeypatch.context() as patch:
            steps = _Steps(patch, target, fail_at=k, error=errors[k % 2])
            try:
                models[1].save_pretrained(target, max_shard_size=SHAPES[shape][1])
                finished = True
            except OSError as error:
                assert error is steps.error
                finished = False
        outcomes.append(_check(target, seen, cache))
        _no_staging_left(tmp_path)
        if finished:  # every step has failed once
            break
    assert outcomes[0] == "old" and outcomes[-1] == "new" and k > 5
    first_new = outcomes.index("new")  # past the commit point, a failure (a final fsync) is
    assert set(outcomes[first_new:]) == {"new"}  # still reported, but nothing goes back


def _no_exchange(a, b):
    raise OSError(errno.EINVAL, "Invalid argument", str(a))


@pytest.mark.parametrize("shape", list(SHAPES))
def test_a_kill_at_any_instant_leaves_a_whole_checkpoint(tmp_path, monkeypatch, models, shape):
    earlier, seen = _prepare(tmp_path, models, shape)
    target = tmp_path / "target"
    shutil.copytree(earlier, target)
    snapshots = []

    def snapshot(directory):
        copy = tmp_path / f"kill-{len(snapshots)}"
        shutil.copytree(directory, copy, copy_function=shutil.copyfile)
        snapshots.append(copy)

    with monkeypatch.context() as patch:
        _Steps(patch, target, snapshot=snapshot)
        models[1].save_pretrained(target, max_shard_size=SHAPES[shape][1])
    cache = {}
    outcomes = [_check(copy, seen, cache) for copy in snapshots]
    assert _check(target, seen, cache) == "new"
    assert outcomes[0] == "old" and len(snapshots) > 5
    _no_staging_left(tmp_path)


def test_a_save_into_the_working_directory_replaces_files_and_keeps_the_folder(
    tmp_path, monkeypatch, models
):
    earlier, seen = _prepare(tmp_path, models, "single -> sharded")
    target = tmp_path / "cwd"
    shutil.copytree(earlier, target)
    monkeypatch.chdir(target)
    inode = os.stat(".").st_ino
    models[1].save_pretrained(".", max_shard_size=SHARDED)
    assert os.stat(".").st_ino == inode == os.stat(target).st_ino
    assert _check(target, seen, {}) == "new"


def test_save_pretrained_leaves_the_live_config_alone(tmp_path, models):
    model = models[0]
    before = model.config.to_dict()
    model.save_pretrained(tmp_path)
    assert model.config.to_dict() == before
    assert transformers.AutoConfig.from_pretrained(tmp_path).architectures == ["GPT2LMHeadModel"]


def test_a_new_directory_appears_whole(tmp_path, monkeypatch, models):
    target = tmp_path / "a" / "new"
    seen = []

    def snapshot(directory):
        seen.append(_fingerprint(directory) if directory.exists() else None)

    with monkeypatch.context() as patch:
        _Steps(patch, target, snapshot=snapshot)
        models[1].save_pretrained(target, max_shard_size=SHARDED)
    assert seen[0] is None and set(seen) <= {None, _fingerprint(target)}  # absent, then whole
    state = _as_transformers_sees_it(target)
    reference = tmp_path / "reference"
    models[1].save_pretrained(reference, max_shard_size=SHARDED)
    assert state == _as_transformers_sees_it(reference)
    assert np.all([p.name.startswith(("model", "config", "generation")) for p in target.iterdir()])
