"""One process of tests/test_multiprocess.py (not a test module itself).

    python tests/multiprocess_worker.py COORDINATOR NUM_PROCESSES PROCESS_ID CHECKPOINT OUT.npz

Joins the run with jax.distributed.initialize, loads the checkpoint onto a global mesh of every
process's CPU devices (each process reading only the slices its own devices hold: the reads are
recorded), runs one data-parallel and one FSDP training step on the same global batch, and writes
the loss, the updated parameters (gathered) and what it read to OUT.npz.
"""

from __future__ import annotations

import sys


def say(*words) -> None:  # the test shows these lines when a process fails or hangs
    print(*words, file=sys.stderr, flush=True)


def main(coordinator: str, num_processes: int, process_id: int, checkpoint: str, out: str):
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=coordinator,
        num_processes=num_processes,
        process_id=process_id,
        initialization_timeout=120,
    )
    say("initialised:", jax.process_index(), jax.device_count(), "devices")
    import numpy as np
    from jax.experimental import multihost_utils

    import flaxauto
    from flaxauto.converters import files
    from multiprocess_common import batch_for, train_step

    read = {"elements": 0}
    original = files.TensorSource.read_slice

    def recording_read_slice(self, key, index):
        block = original(self, key, index)
        read["elements"] += block.size
        return block

    files.TensorSource.read_slice = recording_read_slice
    results = {}
    for preset, mesh_shape in (("data", dict(data=-1, fsdp=1)), ("fsdp", dict(data=1, fsdp=-1))):
        read["elements"] = 0
        mesh = flaxauto.make_mesh(**mesh_shape)
        model = flaxauto.AutoModelForSequenceClassification.from_pretrained(
            checkpoint, mesh=mesh, rules=preset
        )
        results[f"{preset}_read"] = np.asarray(read["elements"])
        say(preset, "loaded")
        batch = flaxauto.shard_batch(batch_for(model.config), mesh)
        loss, params = train_step(model, batch)
        results[f"{preset}_loss"] = np.asarray(loss)
        say(preset, "stepped, loss", float(loss))
        gathered = multihost_utils.process_allgather(params, tiled=True)
        say(preset, "gathered")
        for index, leaf in enumerate(jax.tree.leaves(gathered)):
            results[f"{preset}_param_{index}"] = np.asarray(leaf)
    results["devices"] = np.asarray([jax.device_count(), jax.local_device_count()])
    np.savez(out, **results)
    jax.distributed.shutdown()


if __name__ == "__main__":
    coordinator, count, pid, checkpoint, out = sys.argv[1:]
    main(coordinator, int(count), int(pid), checkpoint, out)
