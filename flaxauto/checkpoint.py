"""Training-state checkpoints with orbax: the model's persistent variables, the optimizer state
and the step, saved asynchronously from a sharded run and restored onto any mesh.

    checkpoints = flaxauto.TrainingCheckpointer("run/checkpoints", max_to_keep=3)
    checkpoints.save(step, model, optimizer)      # returns at once; written in the background
    ...
    step = checkpoints.restore(model, optimizer)  # latest step, into the live model's shardings

Restoring reads each array straight into the sharding the live model and optimizer hold now, so
a run saved on a (data=2, fsdp=4) mesh resumes on (fsdp=8), on one device or on more hosts
(orbax reads only each host's shards). The model is restored in place; an nnx.Optimizer too,
while a plain optax state (a pytree) comes back from `restore_with_state`.

What is saved: parameters, batch statistics and buffers (the checkpoint tensors of
converters.layout.PERSISTENT), not dropout RNG streams, which restart from the model's seed.

orbax-checkpoint is an optional dependency: pip install 'flaxauto[train]'.
"""

from __future__ import annotations

from pathlib import Path

import jax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from flaxauto.converters.layout import PERSISTENT


def _orbax():
    try:
        import orbax.checkpoint as ocp
    except ImportError as error:  # pragma: no cover - the test extra installs it
        raise ImportError(
            "flaxauto's training checkpoints need orbax-checkpoint: pip install 'flaxauto[train]'"
        ) from error
    return ocp


def _model_state(model) -> dict:
    return nnx.to_pure_dict(nnx.state(model, PERSISTENT))


def _optimizer_tree(optimizer):
    """What is saved of an optimizer: an nnx.Optimizer's state as a plain dict, or an optax
    state pytree as it is."""
    if isinstance(optimizer, nnx.Optimizer):
        return nnx.to_pure_dict(nnx.state(optimizer, nnx.OptState))
    return optimizer


def _abstract(tree, mesh):
    """The restore target: each array's shape, dtype and current sharding; an array no one
    placed (an optimizer's step counter) goes replicated onto the model's mesh, since jit
    refuses to mix arrays committed to one device with the mesh's."""

    def target(x):
        sharding = getattr(x, "sharding", None)
        if mesh is not None and not getattr(x, "committed", True):
            sharding = NamedSharding(mesh, PartitionSpec())
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

    return jax.tree.map(target, tree)


class TrainingCheckpointer:
    """Orbax CheckpointManager over (model, optimizer, step), one directory per step."""

    def __init__(
        self,
        directory,
        *,
        max_to_keep: int | None = 3,
        save_interval_steps: int = 1,
        async_save: bool = True,
    ):
        ocp = _orbax()
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            save_interval_steps=save_interval_steps,
            enable_async_checkpointing=async_save,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def save(self, step: int, model, optimizer=None, *, force: bool = False) -> bool:
        """Start saving (returns before the files are written, with async_save); False when
        save_interval_steps skips this step."""
        ocp = _orbax()
        items = {"model": ocp.args.StandardSave(_model_state(model))}
        if optimizer is not None:
            items["optimizer"] = ocp.args.StandardSave(_optimizer_tree(optimizer))
        return self._manager.save(int(step), args=ocp.args.Composite(**items), force=force)

    def restore_with_state(self, model, optimizer=None, step: int | None = None):
        """Restore into `model` (in place) and return (step, optimizer state): the nnx.Optimizer
        itself restored in place, or a new optax state shaped and sharded like `optimizer`."""
        ocp = _orbax()
        step = self.latest_step() if step is None else int(step)
        if step is None:
            raise FileNotFoundError(f"{self.directory}: no checkpoint to restore")
        mesh = getattr(getattr(model, "static", None), "placement", (None, None))[0]
        items = {"model": ocp.args.StandardRestore(_abstract(_model_state(model), mesh))}
        if optimizer is not None:
            target = _abstract(_optimizer_tree(optimizer), mesh)
            items["optimizer"] = ocp.args.StandardRestore(target)
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        _update_pure(model, PERSISTENT, restored["model"])
        if optimizer is None:
            return step, None
        if isinstance(optimizer, nnx.Optimizer):
            _update_pure(optimizer, nnx.OptState, restored["optimizer"])
            return step, optimizer
        return step, restored["optimizer"]

    def restore(self, model, optimizer=None, step: int | None = None) -> int:
        """Restore the model (and an nnx.Optimizer) in place; returns the step."""
        if optimizer is not None and not isinstance(optimizer, nnx.Optimizer):
            raise TypeError("an optax state is immutable: use restore_with_state, which returns it")
        return self.restore_with_state(model, optimizer, step)[0]

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def wait(self) -> None:
        """Block until every started save is on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _update_pure(node, filter_, pure: dict) -> None:
    state = nnx.state(node, filter_)
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(node, state)
