"""The only module that touches Orbax.

Array pytrees are saved with Orbax's StandardCheckpointer (OCDBT/Zarr under the hood) and
restored onto explicit shardings, so a tree saved on one mesh restores onto another. Paths may
be local or gs:// (Orbax writes object stores through epath and TensorStore, and commits a
step there with its own marker file instead of a rename).
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp

from ldot_jax.core import paths


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete or does not match the model."""


def _local_options() -> ocp.options.MultiprocessingOptions:
    me = jax.process_index()
    return ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me},
                                              barrier_sync_key_prefix=f"ldot_local_{me}")


def _local_checkpointer() -> ocp.StandardCheckpointer:
    """An Orbax checkpointer of this process alone (model directories are written by one
    process and read by each on its own: no barriers with the other processes of a job)."""
    return ocp.StandardCheckpointer(multiprocessing_options=_local_options())


def restore_subtree_to_host(path: str | os.PathLike, keys: tuple[str, ...]) -> Any:
    """The subtree at `keys` (e.g. ("params", "model")) of the array pytree saved at `path`,
    as NumPy arrays on this host: only those arrays are read (Orbax's partial restore), no
    device memory is used, and no other process takes part."""
    path = paths.absolute(path)
    subtree = tree_metadata(path)
    for key in keys:
        if not isinstance(subtree, Mapping) or key not in subtree:
            raise CheckpointError(f"{path} holds no {'/'.join(keys)}")
        subtree = subtree[key]
    item = subtree
    for key in reversed(keys):
        item = {key: item}
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
    options = _local_options()
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler(multiprocessing_options=options),
                          multiprocessing_options=options) as checkpointer:
        out = checkpointer.restore(path, args=ocp.args.PyTreeRestore(
            item=item, restore_args=restore_args, partial_restore=True))
    for key in keys:
        out = out[key]
    return out


def save_tree(path: str | os.PathLike, tree: Any) -> None:
    """Writes an array pytree to `path` (which must not exist) and waits for completion."""
    with _local_checkpointer() as checkpointer:
        checkpointer.save(paths.absolute(path), tree)
        checkpointer.wait_until_finished()


def tree_metadata(path: str | os.PathLike) -> Any:
    """Pytree of jax.ShapeDtypeStruct describing what is stored at `path`.

    Raises CheckpointError if `path` is missing or not a complete Orbax checkpoint.
    """
    path = paths.absolute(path)
    if not paths.is_dir(path):
        raise CheckpointError(f"no parameter checkpoint at {path}")
    try:
        with _local_checkpointer() as checkpointer:
            metadata = checkpointer.metadata(path)
    except Exception as e:  # Orbax raises several types for partial or foreign directories.
        raise CheckpointError(
            f"{path} is not a complete Orbax checkpoint (interrupted write?): {e}") from e
    # Newer Orbax wraps the tree in StepMetadata.item_metadata.tree.
    tree = getattr(getattr(metadata, "item_metadata", metadata), "tree", metadata)
    if not isinstance(tree, Mapping):
        raise CheckpointError(f"{path} is not a complete Orbax checkpoint (interrupted write?): "
                              f"its array metadata is missing")
    return jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), tree,
                        is_leaf=lambda m: hasattr(m, "shape") and hasattr(m, "dtype"))


def restore_tree(path: str | os.PathLike, abstract_tree: Any, sharding=None) -> Any:
    """Restores the tree at `path` into the structure, shapes and dtypes of `abstract_tree`.

    `sharding`: a jax.sharding.Sharding for every leaf, or a pytree of them; default: the
    first local device.
    """
    if sharding is None:
        sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    if isinstance(sharding, jax.sharding.Sharding):
        shardings = jax.tree.map(lambda _: sharding, abstract_tree)
    else:
        shardings = sharding
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract_tree, shardings)
    with _local_checkpointer() as checkpointer:
        return checkpointer.restore(paths.absolute(path), target)


# ---------------------------------------------------------------------------------------------
# Training checkpoints: step directories under <workdir>/checkpoints, each holding the train
# state (params, optimizer state, step) and the input pipeline's position.

STATE, DATA = "state", "data"


class TrainCheckpointer:
    """Orbax `CheckpointManager` for training runs.

    Saves are asynchronous (training continues while arrays are written) and atomic (Orbax
    writes a temporary directory and renames it when complete, so a crash never leaves a
    half-written step that `restore` would pick). Preserved: the latest `keep` steps and, when
    `best_metric` is set, the `keep_best` steps with the best value of that metric among
    those saved with metrics (e.g. after an evaluation). `writer=True` (the training run,
    which holds the run directory's lock) also removes what interrupted saves left.
    `use_ocdbt=False` stores each array on its own (Zarr without Orbax's OCDBT database), for
    object stores without conditional writes, which OCDBT's manifest commits rely on
    (train.checkpoint_format="zarr").

    The state is a pytree of global jax.Arrays; it is restored onto whatever shardings the
    abstract target carries, so a run saved on 8 devices resumes on 2 (or on another mesh).
    The data state is a small JSON dict (the grain iterator's `get_state()`), the same on
    every process by construction of the pipeline.
    """

    def __init__(self, directory: str | os.PathLike, keep: int = 3,
                 best_metric: str | None = None, best_mode: str = "max", keep_best: int = 1,
                 async_save: bool = True, writer: bool = False, use_ocdbt: bool = True):
        if best_mode not in ("max", "min"):
            raise ValueError(f"checkpoint best_mode={best_mode!r}: expected 'max' or 'min'")
        if keep < 1:
            raise ValueError(f"checkpoint keep={keep}: expected ≥ 1")
        policies = [ocp.checkpoint_managers.LatestN(keep)]
        if best_metric:
            policies.append(ocp.checkpoint_managers.BestN(
                get_metric_fn=lambda metrics: metrics[best_metric],
                reverse=best_mode == "min", n=keep_best,
                keep_checkpoints_without_metrics=False))
        # best_fn also makes Orbax write each step's metrics to disk, so the best step is
        # still known after a restart (the preservation policy decides what is kept).
        options = ocp.CheckpointManagerOptions(
            preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
            best_fn=(lambda metrics: metrics[best_metric]) if best_metric else None,
            best_mode=best_mode, enable_async_checkpointing=async_save, create=True,
            # The run's writer (it holds the run directory's lock) removes the temporary
            # directories of saves a crash interrupted; a reader must not (a live run owns
            # its in-flight ones).
            cleanup_tmp_directories=writer)
        self.directory = paths.absolute(directory)
        self.best_metric = best_metric
        self.best_mode = best_mode
        if use_ocdbt:
            self._manager = ocp.CheckpointManager(self.directory, options=options,
                                                  item_names=(STATE, DATA))
        else:  # one TensorStore array per leaf (restores read either format)
            registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
            state = ocp.StandardCheckpointHandler(use_ocdbt=False)
            registry.add(STATE, ocp.args.StandardSave, state)
            registry.add(STATE, ocp.args.StandardRestore, state)
            registry.add(DATA, ocp.args.JsonSave, ocp.JsonCheckpointHandler())
            registry.add(DATA, ocp.args.JsonRestore, ocp.JsonCheckpointHandler())
            self._manager = ocp.CheckpointManager(self.directory, options=options,
                                                  handler_registry=registry)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def metric(self, step: int) -> float | None:
        """The `best_metric` value saved with `step` (None without one)."""
        if not self.best_metric:
            return None
        metrics = self._manager.metrics(step)
        if not metrics or self.best_metric not in metrics:
            return None
        return float(metrics[self.best_metric])

    def best_step(self) -> int | None:
        """The kept step with the best `best_metric` (None without metrics)."""
        scored = {step: self.metric(step) for step in self.all_steps()}
        scored = {step: value for step, value in scored.items() if value is not None}
        if not scored:
            return None
        pick = max if self.best_mode == "max" else min
        return pick(scored, key=scored.get)

    def save(self, step: int, state: Any, data_state: Mapping | None = None,
             metrics: Mapping[str, float] | None = None) -> bool:
        """Starts saving `state` (and the pipeline position) as `step`; returns at once."""
        if metrics is not None:
            metrics = {k: float(v) for k, v in metrics.items()}
        return self._manager.save(
            step, args=ocp.args.Composite(**{STATE: ocp.args.StandardSave(state),
                                             DATA: ocp.args.JsonSave(dict(data_state or {}))}),
            metrics=metrics, force=True)

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict]:
        """(state, data_state) of `step` (default: the latest) onto `abstract_state`'s
        shardings (a pytree of jax.ShapeDtypeStruct with `sharding`)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        if step not in self.all_steps():
            raise CheckpointError(f"no step {step} in {self.directory} (steps: "
                                  f"{self.all_steps()})")
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(**{
                STATE: ocp.args.StandardRestore(abstract_state), DATA: ocp.args.JsonRestore()}))
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"checkpoint {self.directory} step {step} does not match "
                                  f"this run's state (model or optimizer changed?): {e}") from e
        return restored[STATE], dict(restored[DATA] or {})

    def wait(self) -> None:
        """Blocks until every started save is on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
